"""Every task's inference wrapper implements `qtune.modeling.inference.InferenceModel` and declares
its batch calls; `qtune.evaluation.sharded.sharded_call` runs any declared call (in one process:
exactly the plain call) and refuses an undeclared one. Sharing over two processes is checked in
tests/test_distributed_encoding.py."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from qtune.evaluation.sharded import sharded_call
from qtune.modeling.inference import InferenceModel
from qtune.tasks import TASKS, resolve

TEXTS = ["a short one", "a much longer text about a parcel that never came", "mid length text"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_wrapper_declares_its_batch_calls(name):
    wrapper = resolve(TASKS[name].wrapper)
    assert issubclass(wrapper, InferenceModel)
    assert wrapper.batch_calls, f"{name}: no batch call declared"
    for call in wrapper.batch_calls:
        parameters = inspect.signature(getattr(wrapper, call)).parameters
        # a batch call takes the inputs, batch_size and progress (by name or through **kwargs)
        assert "batch_size" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()), call
    assert wrapper.features is not InferenceModel.features, f"{name}: features not implemented"
    for option in wrapper.feature_options:
        assert option in inspect.signature(wrapper.features).parameters


def test_a_wrapper_that_is_not_an_inference_model_is_refused(monkeypatch):
    task = TASKS["embedding"]
    monkeypatch.setattr(type(task), "wrapper", "qtune.records:Pair")
    with pytest.raises(TypeError, match="qtune.records:Pair is not a qtune.modeling.inference.InferenceModel"):
        task.wrap(object())


def test_sharded_call_in_one_process_is_the_plain_call(embedder, clf):
    for is_query in (False, True):
        np.testing.assert_array_equal(sharded_call(embedder, "embed", TEXTS, batch_size=2, is_query=is_query),
                                      embedder.embed(TEXTS, batch_size=2, is_query=is_query))
    pairs = list(zip(TEXTS, reversed(TEXTS)))
    np.testing.assert_array_equal(sharded_call(clf, "predict_proba", pairs, batch_size=2),
                                  clf.predict_proba(pairs, batch_size=2))
    assert sharded_call(clf, "predict", pairs, batch_size=2, threshold=0.3) == clf.predict(pairs, threshold=0.3)


def test_an_undeclared_batch_call_is_refused(embedder):
    with pytest.raises(TypeError, match="Embedder has no batch call 'score' \\(it declares embed\\)"):
        sharded_call(embedder, "score", TEXTS, batch_size=2)
