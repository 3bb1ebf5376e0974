"""``python -m lolcats_cli``: the same as the ``lolcats`` command."""

from .cli.main import main

if __name__ == "__main__":
    main()
