"""transformers' model contracts (``ModelTesterMixin``) for stock Qwen2.5-VL and for GAP, side by side.

Run by ``run_transformers_suite.py``, which puts the test tree of the installed transformers' source distribution on
the path as the package ``transformers_tests``. That sdist ships ``tests/test_modeling_common.py`` (the contracts
every transformers model keeps) but not ``tests/models/qwen2_5_vl/`` (the model's tester), so the tester below is
ours: the shape of the upstream Qwen2.5-VL tester (text 32 wide with 4 layers, a 2-block vision tower, one 14 px
image of one patch per row), written against the transformers 5 config.

Two test cases share every test of ``ModelTesterMixin``:

* ``Qwen2_5_VLSuiteTest``: ``Qwen2_5_VLForConditionalGeneration`` on that config;
* ``GapSuiteTest``: ``GapForConditionalGeneration`` on the same config as a ``GapConfig``, whose three latent tokens
  are rows added after the base vocabulary, as ``from_qwen2_5_vl`` adds them. Inputs draw ids from the base vocabulary
  only, so the suite's random text never holds a stray latent token (a malformed span, not a text-only input).

Not in the sdist, so not run: the generation tests (``tests/generation/test_utils.py``) and the export tests
(``tests/exporters/test_export.py``); the runner writes mixins without tests in their place so that
``test_modeling_common`` imports.
"""

from __future__ import annotations

import copy
import unittest
from unittest import mock

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.testing_utils import require_torch, torch_device
from transformers_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor

from configuration_gap import GapConfig
from modeling_gap import GapForConditionalGeneration


class TinyQwen2_5_VLTester:
    """The tiny config and the inputs ``ModelTesterMixin`` asks its ``model_tester`` for."""

    batch_size = 3
    seq_length = 39
    image_position = 32  # <vision_start> just before it
    vocab_size = 99  # ids the inputs draw from
    hidden_size = 32
    num_hidden_layers = 2
    num_attention_heads = 4
    is_training = True
    image_size = 14
    patch_size = 14
    num_channels = 3
    temporal_patch_size = 2
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2
    vision_start_token_id, image_token_id, video_token_id, vision_end_token_id = 3, 4, 5, 6

    def __init__(self, parent: unittest.TestCase):
        self.parent = parent
        self.vision_config = {
            "num_hidden_layers": 2,  # the vision config's `depth`, under the name the suite reads
            "in_chans": self.num_channels,
            "hidden_act": "silu",
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_heads": 4,
            "out_hidden_size": self.hidden_size,
            "patch_size": self.patch_size,
            "spatial_merge_size": 1,
            "temporal_patch_size": self.temporal_patch_size,
        }
        self.text_config = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": 37,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 512,
            "max_window_layers": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def config_fields(self) -> dict:
        return {
            "text_config": copy.deepcopy(self.text_config),
            "vision_config": copy.deepcopy(self.vision_config),
            "tie_word_embeddings": True,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
        }

    def get_config(self) -> Qwen2_5_VLConfig:
        return Qwen2_5_VLConfig(**self.config_fields())

    def prepare_config_and_inputs_for_common(self) -> tuple[Qwen2_5_VLConfig, dict]:
        """Each row: random text with ``<vision_start><image>`` at 31-32 and a pad at the end; labels all 0."""
        reserved = (self.vision_start_token_id, self.image_token_id, self.video_token_id, self.vision_end_token_id)
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        for token_id in reserved:
            input_ids[input_ids == token_id] = self.pad_token_id
        input_ids[:, self.image_position - 1] = self.vision_start_token_id
        input_ids[:, self.image_position] = self.image_token_id
        input_ids[:, -1] = self.pad_token_id
        patches_per_image = (self.image_size // self.patch_size) ** 2
        pixel_values = floats_tensor(
            [self.batch_size * patches_per_image, self.num_channels * self.patch_size**2 * self.temporal_patch_size]
        )
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids, device=torch_device),
            "pixel_values": pixel_values,
            "image_grid_thw": torch.tensor([[1, 1, 1]] * self.batch_size),
            "labels": torch.zeros_like(input_ids, device=torch_device),
        }
        return self.get_config(), inputs


class TinyGapTester(TinyQwen2_5_VLTester):
    """The same model as a ``GapConfig``: three latent token rows after the base vocabulary, K = 4, k = 8."""

    def get_config(self) -> GapConfig:
        fields = self.config_fields()
        base_vocab = fields["text_config"]["vocab_size"]
        fields["text_config"]["vocab_size"] = base_vocab + 3
        return GapConfig(
            **fields,
            latent_tokens_per_span=4,
            pca_num_components=8,
            latent_adapter_size=16,
            latent_start_token_id=base_vocab,
            latent_pad_token_id=base_vocab + 1,
            latent_end_token_id=base_vocab + 2,
        )


@require_torch
class Qwen2_5_VLSuiteTest(ModelTesterMixin, unittest.TestCase):
    """Stock Qwen2.5-VL under transformers' common model tests: the reference run."""

    all_model_classes = (Qwen2_5_VLForConditionalGeneration,)
    model_tester_class = TinyQwen2_5_VLTester
    _is_composite = True  # text and vision sub-configs

    def setUp(self):
        self.model_tester = self.model_tester_class(self)

    @unittest.skip(reason="asks for GenerationTesterMixin, whose module (tests/generation) the sdist does not ship")
    def test_generation_tester_mixin_inheritance(self):
        pass


@require_torch
# The suite finds language-model heads by class name in transformers' tables; GAP's checkpoints register the class as
# `AutoModelForImageTextToText` (its remote code), so it is listed there for each test, as Qwen2.5-VL is.
@mock.patch.dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, {GapConfig.model_type: "GapForConditionalGeneration"})
class GapSuiteTest(Qwen2_5_VLSuiteTest):
    """The same tests with GAP in place of the stock class."""

    all_model_classes = (GapForConditionalGeneration,)
    model_tester_class = TinyGapTester
    # test_can_init_all_missing_weights dates a model by the copyright line of its config file, which
    # configuration_gap.py lacks (year 0, "not a prioritized model"); Qwen2.5-VL (2025) runs it, so GAP opts in.
    test_can_init_all_missing_weights_before_2023 = True
