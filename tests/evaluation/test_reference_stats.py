"""Reference statistics: ours, ADM reference batches (mu/sigma and arr_0), image folders, token shards."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data.synthetic_shards import make_token_shards, record_tokens
from tests.evaluation.helpers import PooledPixelExtractor, blob_images, seeded_classifier
from tests.models.tiny import VAE_KW
from var_train.evaluation.features import build_feature_extractor
from var_train.evaluation.reference_stats import (ADM_EXTRACTOR, center_crop_resize, compute_fid_stats,
                                                  load_reference, save_reference_stats, statistics_from_features)
from var_train.models import VQVAE
from var_train.models.checkpoint_io import save_model


class InceptionShaped(PooledPixelExtractor):
    """Stands in for the Inception extractor by name (the only one ADM's mu/sigma are valid for)."""
    name = "inception-v3-compat"


def _nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


def test_adm_npz_with_mu_sigma_is_read_as_is(tmp_path):
    generator = np.random.default_rng(0)
    mu = generator.normal(size=48)
    a = generator.normal(size=(48, 48))
    sigma = a @ a.T
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    stats = load_reference(path, InceptionShaped(), progress=False)
    np.testing.assert_array_equal(stats.mu, mu)
    np.testing.assert_array_equal(stats.sigma, sigma)
    assert stats.extractor == ADM_EXTRACTOR and stats.features is None
    with pytest.raises(ValueError, match="precision/recall need per-image features"):
        load_reference(path, InceptionShaped(), need_features=True, progress=False)
    with pytest.raises(ValueError, match="Inception features, not 'pooled-pixels'"):
        load_reference(path, PooledPixelExtractor(), progress=False)


def test_adm_npz_with_images_is_scored_with_our_extractor(tmp_path):
    images = blob_images(30, seed=1)
    extractor = PooledPixelExtractor()
    path = tmp_path / "batch.npz"
    np.savez(path, arr_0=_nhwc(images))
    stats = load_reference(path, extractor, need_features=True, batch_size=7, progress=False)
    features = extractor(images).features.double().numpy()
    np.testing.assert_allclose(stats.mu, features.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-5, atol=1e-10)
    assert stats.count == 30 and stats.resolution == 16 and stats.features.shape == (30, 48)

    # both present: FID uses the published moments, the images give precision/recall features
    mu, sigma = np.full(48, 0.25), np.eye(48)
    both = tmp_path / "both.npz"
    np.savez(both, arr_0=_nhwc(images), mu=mu, sigma=sigma)
    stats = load_reference(both, InceptionShaped(), need_features=True, progress=False)
    np.testing.assert_array_equal(stats.mu, mu)
    assert stats.features.shape == (30, 48)

    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((2, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="arr_0 must be uint8 images"):
        load_reference(bad, extractor, progress=False)


def test_our_stats_round_trip_and_refuse_another_extractor(tmp_path):
    extractor = PooledPixelExtractor()
    stats = statistics_from_features(extractor(blob_images(20, seed=2)).features, extractor.name, 16)
    path = save_reference_stats(stats, tmp_path / "stats.npz")
    loaded = load_reference(path, extractor, need_features=True)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, stats.features)
    assert (loaded.count, loaded.resolution, loaded.extractor) == (20, 16, "pooled-pixels")
    assert loaded.mu.dtype == np.float64 and loaded.sigma.dtype == np.float64

    class Other(PooledPixelExtractor):
        name = "other-classifier"

    with pytest.raises(ValueError, match="recompute them with `var-train fid-stats`"):
        load_reference(path, Other())
    slim = save_reference_stats(statistics_from_features(stats.features, extractor.name, 16, keep_features=False),
                                tmp_path / "slim.npz")
    with pytest.raises(ValueError, match="no per-image features"):
        load_reference(slim, extractor, need_features=True)
    with pytest.raises(FileNotFoundError, match="reference not found"):
        load_reference(tmp_path / "missing.npz", extractor)


def test_image_folder_is_centre_cropped_to_the_resolution(tmp_path):
    wide = Image.new("RGB", (60, 20), (255, 255, 255))
    wide.paste((0, 0, 0), (20, 0, 40, 20))  # black centre square, white sides
    cropped = center_crop_resize(wide, 10)
    assert cropped.shape == (10, 10, 3) and cropped.max() < 40  # only the dark centre is kept

    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    images = blob_images(12, seed=4)
    for i, image in enumerate(_nhwc(images)):
        Image.fromarray(image).save(folder / ("a" if i % 2 else "b") / f"{i}.png")
    extractor = PooledPixelExtractor()
    stats = load_reference(folder, extractor, need_features=True, progress=False)
    assert stats.count == 12 and stats.resolution == 16
    features = extractor(images).features.double().numpy()
    np.testing.assert_allclose(np.sort(stats.features[:, 0]), np.sort(features[:, 0]), rtol=1e-6)
    np.testing.assert_allclose(stats.mu, features.mean(0), rtol=1e-6)


def test_fid_stats_of_token_shards_decode_through_the_vae(tmp_path):
    torch.manual_seed(0)
    vae = VQVAE(**VAE_KW).eval()
    vae_path = save_model(vae, tmp_path / "vae.safetensors")
    make_token_shards(tmp_path / "shards", num_records=9, shard_size=4, vocab_size=VAE_KW["vocab_size"])
    extractor = seeded_classifier(2)  # fid-stats takes a checkpoint, which pooled pixels do not have
    extractor_path = extractor.save(tmp_path / "classifier.safetensors")
    stats, path = compute_fid_stats(out=tmp_path / "stats.npz", shards=tmp_path / "shards", vae=vae_path,
                                    feature_extractor=str(extractor_path), batch_size=4, progress=False)
    assert path.is_file() and stats.count == 9 and stats.resolution == 64
    sizes = [p * p for p in VAE_KW["patch_nums"]]
    tokens = torch.from_numpy(np.stack([record_tokens(i, sum(sizes), VAE_KW["vocab_size"]) for i in range(9)]).astype(np.int64))
    with torch.no_grad():
        images = vae.tokens_to_image(list(tokens.split(sizes, dim=1)))
    expected = extractor(images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)).features.double().numpy()
    np.testing.assert_allclose(np.sort(stats.features, axis=0), np.sort(expected, axis=0), rtol=1e-4, atol=1e-6)
    loaded = load_reference(path, build_feature_extractor(str(extractor_path)))
    np.testing.assert_allclose(loaded.mu, expected.mean(0), rtol=1e-4, atol=1e-7)
