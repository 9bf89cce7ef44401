"""`make run`'s terminal (issue 14, section 5): loading the base draws no transformers "Loading
weights" progress bar on stderr, and the progress-bar setting is left as it was."""
from __future__ import annotations

import contextlib

import pytest
import torch
from transformers.utils import logging as hf_logging

from service.models import load_model
from service.models.loader import quiet_weight_loading

BAR = "Loading weights"


def test_plain_from_pretrained_draws_the_bar_that_load_model_does_not(converted, capfd):
    from transformers import AutoModelForCausalLM

    assert hf_logging.is_progress_bar_enabled()
    # The control: this transformers does draw it (else the test below could not fail).
    AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    assert BAR in capfd.readouterr().err
    for quantize in (False, True):
        load_model(converted, quantize_4bit=quantize, device="cpu")
        assert BAR not in capfd.readouterr().err, quantize
    assert hf_logging.is_progress_bar_enabled()  # restored for everything else


@pytest.mark.parametrize("raises", [False, True])
def test_quiet_weight_loading_restores_the_setting(raises):
    assert hf_logging.is_progress_bar_enabled()
    with pytest.raises(RuntimeError) if raises else contextlib.nullcontext():
        with quiet_weight_loading():
            assert not hf_logging.is_progress_bar_enabled()
            if raises:
                raise RuntimeError("load failed")
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # already off: stays off
    try:
        with quiet_weight_loading():
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()

