"""Batched AutoAugment (CIFAR-10 policy) against torchvision's AutoAugment applied image by image."""
import pytest
import torch
from torchvision.transforms.v2 import AutoAugment, AutoAugmentPolicy, InterpolationMode

from trainables import autoaugment as aa, augment, darl, data, ricasso

REFERENCE = AutoAugment(AutoAugmentPolicy.CIFAR10, fill=[float(aa.LGLA_FILL)] * 3)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors (tests/conftest.py)


@pytest.fixture(scope="module")
def images(data_dir, cache_dir) -> torch.Tensor:
    """32 real CIFAR-10 training images, uint8 [32, 3, 32, 32]."""
    loaded = data.load_id_data(data.DatasetSpec(n_max=4, imbalance_ratio=1, val_per_class=0),
                               data_dir, cache_dir, download=False)
    return augment.to_device_images(loaded.train.x[:32], torch.device("cpu"))


def torchvision_one(image: torch.Tensor, policy: int, on, negate) -> torch.Tensor:
    """torchvision's AutoAugment on one image with the sub-policy, coins and signs given."""
    for slot, (name, _, bin_) in enumerate(aa.CIFAR10_POLICY[policy]):
        if on[slot]:
            m = aa.magnitude(name, bin_)
            m = -m if name in aa.SIGNED and negate[slot] else m
            image = REFERENCE._apply_image_or_video_transform(
                image, name, m, interpolation=InterpolationMode.NEAREST, fill=REFERENCE._fill)
    return image


def torchvision_batch(x: torch.Tensor, draws: aa.Draws) -> torch.Tensor:
    return torch.stack([torchvision_one(x[i], int(draws.policy[i]), draws.on[i], draws.negate[i])
                        for i in range(len(x))])


def test_policy_table_and_bins_are_torchvisions():
    assert [tuple(map(tuple, p)) for p in REFERENCE._policies] == list(aa.CIFAR10_POLICY)
    for sub in aa.CIFAR10_POLICY:
        for name, _, bin_ in sub:
            bins = REFERENCE._AUGMENTATION_SPACE[name][0](aa.NUM_BINS, 32, 32)
            assert aa.magnitude(name, bin_) == (0.0 if bins is None else float(bins[bin_]))
            assert (name in aa.SIGNED) == REFERENCE._AUGMENTATION_SPACE[name][1]
    assert aa.magnitude("TranslateX", 9) == pytest.approx(150 / 331 * 32)   # 14.5 px -> int 14
    assert aa.magnitude("Posterize", 7) == 5 and aa.magnitude("Solarize", 0) == 1.0


@pytest.mark.parametrize("policy", range(len(aa.CIFAR10_POLICY)))
def test_each_forced_sub_policy_matches_torchvision_image_by_image(images, policy):
    """Both slots on, random signs: every op, every magnitude used, both signs, exact to the pixel
    (integer ops, colour blends and nearest-neighbour geometry alike), on both batch paths."""
    b = len(images)
    signs = torch.Generator().manual_seed(policy)
    draws = aa.Draws(torch.full((b,), policy), torch.ones(b, 2, dtype=torch.bool),
                     torch.rand(b, 2, generator=signs) <= 0.5)
    expected = torchvision_batch(images, draws)
    for gather in (True, False):
        ours = aa.apply(images, draws, gather=gather)
        assert ours.dtype == torch.uint8 and ours.shape == images.shape
        assert torch.equal(ours, expected)
    assert not torch.equal(expected, images)


def test_drawn_batch_matches_torchvision_and_both_paths_agree(images):
    draws = aa.draw(len(images), torch.Generator().manual_seed(3), torch.device("cpu"))
    expected = torchvision_batch(images, draws)
    assert torch.equal(aa.apply(images, draws, gather=True), expected)
    assert torch.equal(aa.apply(images, draws, gather=False), expected)


def test_bf16_autocast_around_it_changes_nothing(images):
    """RICASSO transforms its re-drawn stream inside the trial's autocast."""
    draws = aa.draw(len(images), torch.Generator().manual_seed(5), torch.device("cpu"))
    plain = aa.apply(images, draws, gather=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(aa.apply(images, draws, gather=False), plain)


def test_a_slot_that_is_off_leaves_the_image_alone(images):
    b = len(images)
    draws = aa.Draws(torch.arange(b) % 25, torch.zeros(b, 2, dtype=torch.bool), torch.zeros(b, 2, dtype=torch.bool))
    assert torch.equal(aa.apply(images, draws), images)


def test_draws_are_uniform_over_sub_policies_with_torchvisions_coins():
    n = 50_000
    draws = aa.draw(n, torch.Generator().manual_seed(0), torch.device("cpu"))
    freq = torch.bincount(draws.policy, minlength=25).float() / n
    assert (freq - 1 / 25).abs().max() < 0.004      # 5 sigma of a binomial share at n = 50k
    prob = torch.tensor([[p for _, p, _ in sub] for sub in aa.CIFAR10_POLICY])[draws.policy]
    assert (draws.on.float().mean(0) - prob.mean(0)).abs().max() < 0.01
    assert not draws.on[prob == 0].any() and abs(draws.negate.float().mean().item() - 0.5) < 0.01


def test_same_seed_same_images_other_seed_other_images(images):
    first = aa.autoaugment(images, torch.Generator().manual_seed(7))
    assert torch.equal(first, aa.autoaugment(images, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, aa.autoaugment(images, torch.Generator().manual_seed(8)))


def test_lgla_methods_run_autoaugment_by_default_and_record_it(images):
    counts = data.lt_counts(10, 100, 10)
    for module, cfg_cls in ((darl, darl.DarlConfig), (ricasso, ricasso.RicassoConfig)):
        assert cfg_cls().autoaugment is True and cfg_cls().to_dict()["autoaugment"] is True
        on = module.Method(cfg_cls(device="cpu"), counts, torch.device("cpu"))
        off = module.Method(cfg_cls(device="cpu", autoaugment=False), counts, torch.device("cpu"))
        assert "AutoAugment" in on.augment_rule
        # Same generator state: crop/flip/cutout alone is the base transform; with AutoAugment the
        # crop and flip are the same and the policy is applied before the cutout.
        plain = off.train_transform(images, torch.Generator().manual_seed(1))
        base = augment.normalize(augment.crop_flip_cutout(images, torch.Generator().manual_seed(1)))
        assert torch.equal(plain, base)
        gen = torch.Generator().manual_seed(1)
        cropped = augment.crop_flip_cutout(images, gen, cutout=0)
        expected = augment.normalize(augment.cut_out(aa.autoaugment(cropped, gen), gen))
        assert torch.equal(on.train_transform(images, torch.Generator().manual_seed(1)), expected)
        assert not torch.equal(expected, base)
