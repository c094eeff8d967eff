"""Fixtures of the pipeline's tests."""
import pytest

from task_inputs import dense_checkpoint


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """``inputs(task)``: a 2-block dense checkpoint of ``task`` and its scores (untrained: the tests exercise the
    command line, not accuracy), made once per module and task."""
    made = {}

    def get(task):
        if task not in made:
            made[task] = dense_checkpoint(task, tmp_path_factory.mktemp(task))
        return made[task]
    return get
