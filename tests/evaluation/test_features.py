"""Feature extractors: the Inception weights come from a local file or fail clearly; classifiers
load from their checkpoints."""

import pytest
import torch

from tests.evaluation.helpers import seeded_classifier
from var_train.errors import MissingInputError
from var_train.evaluation.features import build_feature_extractor, to_uint8_images
from var_train.evaluation.inception import (INCEPTION_WEIGHTS_FILENAME, InceptionFeatureExtractor,
                                            MissingInceptionWeightsError, default_inception_weights_path)


def test_missing_inception_weights_is_a_clear_error_not_a_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    assert default_inception_weights_path() == expected
    with pytest.raises(MissingInceptionWeightsError) as error:
        build_feature_extractor("inception")
    message = str(error.value)
    assert str(expected) in message and "--inception-weights" in message and "https://" in message
    with pytest.raises(MissingInceptionWeightsError, match="nowhere.pth"):
        InceptionFeatureExtractor(tmp_path / "nowhere.pth")


def test_inception_weights_load_from_the_torch_home_cache_or_an_explicit_path(tmp_path, monkeypatch):
    """Stand-in weights (the untrained network's own state dict) written where the real file goes."""
    torch.manual_seed(0)
    untrained = InceptionFeatureExtractor(random_init=True)
    weights = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    weights.parent.mkdir(parents=True)
    torch.save(untrained.network.state_dict(), weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    from_cache = build_feature_extractor("inception")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = untrained(images)
    got = from_cache(images)
    assert got.features.shape == (2, 2048) and got.logits.shape == (2, 1008)
    torch.testing.assert_close(got.features, expected.features)
    torch.testing.assert_close(got.logits, expected.logits)
    assert from_cache.name == "inception-v3-compat" and not from_cache.training
    # float images in [0, 1] are the same images
    torch.testing.assert_close(from_cache(images.float() / 255).features, got.features)

    not_inception = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, not_inception)
    with pytest.raises(ValueError, match="not torch-fidelity's Inception"):
        InceptionFeatureExtractor(not_inception)


def test_classifier_extractor_round_trips_through_its_checkpoint(tmp_path):
    extractor = seeded_classifier(3)
    path = extractor.save(tmp_path / "classifier.safetensors")
    loaded = build_feature_extractor(str(path))
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(loaded(images).features, extractor(images).features)
    assert loaded.num_logits == 10 and loaded.name.startswith("small-cnn-classifier-")
    loaded.train()
    assert not loaded.training  # an extractor never leaves eval mode
    with pytest.raises(MissingInputError, match="is neither") as error:
        build_feature_extractor(str(tmp_path / "missing.safetensors"))
    assert "'inception'" in str(error.value) and "classifier checkpoint" in str(error.value)


def test_extractors_are_chosen_by_the_registry():
    """Every kind registers itself; the registry (features.py) imports none of them."""
    import ast
    import inspect

    from var_train.evaluation import features

    assert {"inception", "classifier"} <= set(features.registered_extractors())
    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(features)))
                if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"classifier", "inception", "var_train.evaluation.classifier", "var_train.evaluation.inception"}


def test_to_uint8_images_validates_input():
    assert to_uint8_images(torch.full((1, 3, 2, 2), 0.5)).unique().item() == 128
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        to_uint8_images(torch.zeros(3, 2, 2))
    with pytest.raises(TypeError):
        to_uint8_images(torch.zeros(1, 3, 2, 2, dtype=torch.int32))
