"""The example plugin passes the lolcats conformance kit: copy this file along with the plugin."""

import pytest

from lolcats_cli.errors import ConfigError
from lolcats_cli.testing import check_feature_map
from lolcats_example_plugin import Softplus


def test_conformance_default_params() -> None:
    check_feature_map(Softplus)


def test_conformance_other_params() -> None:
    check_feature_map(Softplus, {"feature_dim": 9, "beta": 4.0})


def test_bad_params_are_reported() -> None:
    with pytest.raises(ConfigError, match="beta"):
        check_feature_map(Softplus, {"beta": -1.0})
