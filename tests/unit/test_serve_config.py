"""`distill serve` settings: a replica admits enough requests for a batch to fill."""

import pytest
from pydantic import ValidationError

from distill.deploy.config import ServeConfig
from distill.deploy.serve import max_ongoing


def test_a_replica_admits_twice_a_batch_by_default():
    assert max_ongoing(ServeConfig(bundle="b")) == 64
    assert max_ongoing(ServeConfig(bundle="b", max_batch_size=8, max_ongoing_requests=9)) == 9


def test_a_cap_below_the_batch_size_is_refused():
    with pytest.raises(ValidationError, match="max_ongoing_requests .4. is below max_batch_size .8."):
        ServeConfig(bundle="b", max_batch_size=8, max_ongoing_requests=4)
