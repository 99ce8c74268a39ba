"""Metrics against the references users trust: scikit-image for PSNR/SSIM, the lpips package
for LPIPS, torch-fidelity's Frechet formula for FID/FVD (random networks: nothing downloads)."""

import numpy as np
import pytest
import skimage.data
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vitok_fast import metrics as M

PHOTOS = ("astronaut", "chelsea", "coffee")


def _photo_pair(name, rng, amplitude=20):
    a = getattr(skimage.data, name)()
    noise = rng.integers(-amplitude, amplitude + 1, a.shape)
    b = np.clip(a.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return a, b


def _t(a):
    return torch.from_numpy(a).permute(2, 0, 1)[None]


@pytest.mark.parametrize("name", PHOTOS)
def test_psnr_and_ssim_equal_scikit_image_on_real_photos(name):
    a, b = _photo_pair(name, np.random.default_rng(0))
    ref_psnr = peak_signal_noise_ratio(a, b, data_range=255)
    ref_ssim = structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=255, channel_axis=-1)
    assert abs(M.psnr(_t(a), _t(b)).item() - ref_psnr) < 1e-4
    assert abs(M.ssim(_t(a), _t(b)).item() - ref_ssim) < 1e-3
    # float [0, 1] input gives the same numbers as uint8
    assert abs(M.ssim(_t(a).double() / 255, _t(b).double() / 255).item() - ref_ssim) < 1e-3


def test_ssim_is_per_image_in_a_batch():
    rng = np.random.default_rng(1)
    pairs = [_photo_pair("astronaut", rng, amp) for amp in (5, 40)]
    a = torch.cat([_t(p[0]) for p in pairs])
    b = torch.cat([_t(p[1]) for p in pairs])
    batch = M.ssim(a, b)
    single = torch.stack([M.ssim(a[i:i + 1], b[i:i + 1])[0] for i in range(2)])
    assert torch.allclose(batch, single, atol=1e-12)
    assert batch[0] > batch[1] + 0.1  # more noise, lower SSIM
    assert M.psnr(a, a).isinf().all()


def test_metrics_reject_mismatched_or_tiny_images():
    with pytest.raises(ValueError, match="same shape"):
        M.psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 8))
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_quantize_rounds_like_an_8bit_image():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])
    assert M.quantize(x).tolist() == [0, 0, 128, 255, 255]
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(M.quantize(M.dequantize(u)), u)


def test_frechet_distance_matches_torch_fidelity_and_streams():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 64, generator=g), torch.randn(200, 64, generator=g) * 1.3 + 0.2
    sa, sb = M.FrechetStats(64), M.FrechetStats(64)
    for chunk in a.split(70):  # streaming in uneven batches
        sa.update(chunk)
    sb.update(b)
    mu, cov = sa.mean_cov()
    assert np.abs(mu - a.double().mean(0).numpy()).max() < 1e-12
    assert np.abs(cov - np.cov(a.double().numpy(), rowvar=False)).max() < 1e-12
    (m1, c1), (m2, c2) = sa.mean_cov(), sb.mean_cov()
    ref = fid_statistics_to_metric({"mu": m1, "sigma": c1}, {"mu": m2, "sigma": c2}, False)
    ours = M.frechet_distance(sa, sb)
    assert ours > 1.0
    assert abs(ours - ref["frechet_inception_distance"]) < 1e-8 * ours
    assert abs(M.frechet_distance(sa, sa)) < 1e-8


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    path = M.save_random_inception(tmp_path_factory.mktemp("inception") / M.INCEPTION_FILE)
    return M.load_inception(path)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(random_inception):
    crops = []
    for name in PHOTOS:
        img = _t(getattr(skimage.data, name)())[0]
        crops += [img[:, :128, :128], img[:, -128:, -128:]]
    real = torch.stack(crops)  # 6 uint8 crops of real photos
    g = torch.Generator().manual_seed(0)

    def stats(images):
        s = M.FrechetStats(2048)
        s.update(M.inception_features(random_inception, images))
        return s

    def noisy(sigma):
        x = M.dequantize(real) + sigma * torch.randn(real.shape, generator=g)
        return M.quantize(x)

    ref = stats(real)
    self_fid = M.frechet_distance(ref, stats(real.clone()))
    low, high = M.frechet_distance(ref, stats(noisy(0.05))), M.frechet_distance(ref, stats(noisy(0.4)))
    # rank-deficient covariances (6 samples, 2048-d) leave float round-off in the square root
    assert abs(self_fid) < 1e-3 * low
    assert 0 < low < high


def test_i3d_features_separate_clean_and_noisy_clips(tmp_path):
    torch.manual_seed(0)
    i3d = M.I3D()
    path = tmp_path / M.I3D_FILE
    torch.save(i3d.state_dict(), path)
    loaded = M.load_i3d(path)  # the file round-trips through the loader
    clips = torch.randint(0, 256, (2, 3, 16, 32, 32), dtype=torch.uint8)
    real = M.i3d_features(loaded, clips)
    assert real.shape == (2, 400)
    assert torch.allclose(real, M.i3d_features(i3d.eval(), clips), atol=1e-6)
    noise = 0.5 * torch.randn(clips.shape)
    noisy = M.i3d_features(loaded, M.quantize(M.dequantize(clips) + noise))
    sa, sb = M.FrechetStats(400), M.FrechetStats(400)
    sa.update(real), sb.update(noisy)
    assert abs(M.frechet_distance(sa, sa)) < 1e-9
    assert M.frechet_distance(sa, sb) > 0
    with pytest.raises(ValueError, match="at least 9 frames"):
        M.i3d_features(loaded, clips[:, :, :8])
    with pytest.raises(ValueError, match="expected uint8 clips"):
        M.i3d_features(loaded, clips.float())


def test_missing_or_wrong_weights_name_the_expected_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=M.INCEPTION_FILE):
        M.load_inception(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=M.I3D_FILE):
        M.load_i3d(None)
    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=M.I3D_FILE):
        M.load_i3d(bad)


def test_missing_vgg_weights_say_how_to_train_without_them(tmp_path):
    from vitok_fast.perceptual import load_lpips
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth.*--lpips-vgg .*nope\.pth.*"
                                                r"--lpips-weight 0"):
        load_lpips(tmp_path / "nope.pth")
