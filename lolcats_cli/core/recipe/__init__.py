"""Recipes: the typed settings (``recipe``), the shipped recipe files (``recipe_files``), the one engine that
checks every value a user writes (``typecheck``) and ``lolcats init`` (``init_recipe``)."""
