"""Vision encoders (packaged / random / meta), weights loading and its errors, transforms, feature cache,
projector. Real timm models at real sizes; images from the packaged easy-VQA data."""
from __future__ import annotations

import pytest
import torch
from easy_vqa import get_train_image_paths
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from mtcpeft.models import vision
from mtcpeft.models.projector import Projector
from mtcpeft.models.vision import (
    FeatureCacheMismatch,
    VisionWeightsError,
    build_vision_encoder,
    cached_features,
    encode_images,
    feature_meta,
    image_transform,
    load_features,
    save_features,
)


@pytest.fixture(scope="module")
def packaged():
    return build_vision_encoder("efficientnet_lite0", "packaged")


@pytest.fixture(scope="module")
def random_effnet():
    torch.manual_seed(0)
    return build_vision_encoder("efficientnet_lite0", "none")


@pytest.fixture(scope="module")
def swin_tiny():
    return build_vision_encoder("swinv2_tiny_window8_256", "none")


@pytest.fixture(scope="module")
def image_paths():
    paths = get_train_image_paths()
    return [paths[i] for i in range(8)]


@pytest.fixture(scope="module")
def pixels(packaged, image_paths):  # (8, 3, 224, 224)
    tf = image_transform(packaged)
    return torch.stack([tf(Image.open(p)) for p in image_paths])


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("which", ["packaged", "random_effnet"])
def test_efficientnet_tokens(which, request, pixels):
    enc = request.getfixturevalue(which)
    assert enc.name == "tf_efficientnet_lite0"
    assert (enc.image_size, enc.grid, enc.num_tokens, enc.dim) == (224, (7, 7), 49, 1280)
    out = enc(pixels[:2])
    assert out.shape == (2, 49, 1280)
    fmap = enc.model.forward_features(pixels[:2])  # (B, C, h, w): token i*w + j is position (i, j)
    torch.testing.assert_close(out[:, 3 * 7 + 5], fmap[:, :, 3, 5])


def test_swinv2_tiny_tokens(swin_tiny):
    assert (swin_tiny.image_size, swin_tiny.grid, swin_tiny.num_tokens, swin_tiny.dim) == (256, (8, 8), 64, 768)
    x = torch.randn(1, 3, 256, 256)
    out = swin_tiny(x)
    assert out.shape == (1, 64, 768)
    fmap = swin_tiny.model.forward_features(x)  # (B, h, w, C)
    torch.testing.assert_close(out[:, 2 * 8 + 6], fmap[:, 2, 6])


def test_swinv2_large_shapes_on_meta():
    # a real build takes ~4 s and 800 MB of float32 for 197M parameters; the meta device checks shapes for free
    enc = build_vision_encoder("swinv2_large_window12to16_192to256", "none", device="meta")
    assert (enc.image_size, enc.num_tokens, enc.dim) == (256, 64, 1536)
    with pytest.raises(ValueError, match="only works with pretrained='none'"):
        build_vision_encoder("swinv2_large_window12to16_192to256", "packaged", device="meta")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown timm model"):
        build_vision_encoder("swinv2_tinny_window8_256")


# ------------------------------------------------------------------------------------------------ frozen
def test_frozen_and_stays_eval(packaged, pixels):
    parent = nn.Sequential(packaged, Projector(packaged.dim, 32)).train()
    assert not packaged.training and not packaged.model.training
    assert all(not m.training for m in packaged.model.modules())
    assert not any(p.requires_grad for p in packaged.parameters())
    stats = packaged.model.bn1.running_mean.clone()
    out = parent(pixels[:2])
    out.sum().backward()
    assert torch.equal(packaged.model.bn1.running_mean, stats)  # BatchNorm statistics untouched
    assert all(p.grad is None for p in packaged.parameters())
    assert parent[1].proj.weight.grad is not None


# ------------------------------------------------------------------------------------------ packaged weights
def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().float()


def test_packaged_weights_are_real(packaged, random_effnet, pixels):
    own, rnd = packaged.model.state_dict(), random_effnet.model.state_dict()
    assert packaged.fingerprint() != random_effnet.fingerprint()
    assert not torch.equal(own["conv_stem.weight"], rnd["conv_stem.weight"])
    # (b) every BatchNorm carries trained statistics, not the (0, 1) init
    for key in own:
        if key.endswith("running_var"):
            assert not torch.allclose(own[key], torch.ones_like(own[key])), key
            assert own[key.replace("running_var", "running_mean")].abs().sum() > 0, key
    # (b') ... and they describe these images: per-channel variance of the stem output ranks like running_var
    with torch.no_grad():
        for model, lo, hi in ((packaged.model, 0.7, 1.0), (random_effnet.model, -1.0, 0.6)):
            var = model.conv_stem(pixels).var((0, 2, 3))
            rho = torch.corrcoef(torch.stack([_ranks(var), _ranks(model.bn1.running_var)]))[0, 1]
            assert lo < rho <= hi, rho  # measured: 0.91 packaged, ~0.25 random
    # (c) ImageNet predictions are confident (random init: ~6.0-6.1 nats, near log(1000) = 6.9)
    with torch.no_grad():
        entropy = [torch.special.entr(m(pixels).softmax(-1)).sum(-1).mean()
                   for m in (packaged.model, random_effnet.model)]
    assert entropy[0] < entropy[1] - 0.8, entropy  # measured: 4.65 vs 6.11


def test_local_checkpoint_round_trip(packaged, tmp_path):
    path = tmp_path / "lite0.safetensors"
    sd = {k: v for k, v in packaged.model.state_dict().items() if not k.startswith("classifier")}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))  # a head-less checkpoint is fine
    enc = build_vision_encoder("efficientnet_lite0", str(path))
    torch.testing.assert_close(enc.model.state_dict()["bn2.running_var"], sd["bn2.running_var"])
    torch.save({"state_dict": sd}, tmp_path / "lite0.pth")  # the usual training-checkpoint wrapper
    assert build_vision_encoder("efficientnet_lite0", str(tmp_path / "lite0.pth")).model.bn1.running_var.equal(
        sd["bn1.running_var"])


def test_bad_checkpoints_raise_clear_errors(packaged, tmp_path, monkeypatch):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02not a checkpoint" * 10)
    with pytest.raises(VisionWeightsError, match="cannot read checkpoint"):
        build_vision_encoder("efficientnet_lite0", str(corrupt))
    with pytest.raises(VisionWeightsError, match="does not exist"):
        build_vision_encoder("efficientnet_lite0", str(tmp_path / "missing.safetensors"))

    sd = dict(packaged.model.state_dict())
    sd["conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    torch.save(sd, tmp_path / "wrong_shape.pth")
    with pytest.raises(VisionWeightsError, match="1 wrong shapes.*conv_head.weight"):
        build_vision_encoder("efficientnet_lite0", str(tmp_path / "wrong_shape.pth"))
    with pytest.raises(VisionWeightsError, match="missing"):  # another architecture's checkpoint
        build_vision_encoder("swinv2_tiny_window8_256", str(tmp_path / "wrong_shape.pth"))

    # the packaged file is mapped by order: a file whose order or length differs is refused, not half-loaded
    original = torch.load(vision.packaged_weights_path(), map_location="cpu", weights_only=True)
    keys = list(original)
    swapped = dict(original)
    swapped[keys[0]], swapped[keys[6]] = original[keys[6]], original[keys[0]]  # conv_stem <-> blocks.0 conv_dw
    for bad, message in ((dict(list(original.items())[:-2]), "has 294 tensors"),
                         (dict(zip(keys, swapped.values())), "tensor #0 .* does not line up")):
        torch.save(bad, tmp_path / "bad_package.pth")
        monkeypatch.setattr(vision, "packaged_weights_path", lambda: tmp_path / "bad_package.pth")
        with pytest.raises(VisionWeightsError, match=message):
            build_vision_encoder("efficientnet_lite0", "packaged")
    with pytest.raises(VisionWeightsError, match="only for efficientnet_lite0"):
        build_vision_encoder("swinv2_tiny_window8_256", "packaged")


def test_hub_offline_names_the_fix(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    with pytest.raises(VisionWeightsError, match="(?s)could not download.*'packaged'.*local checkpoint path"):
        build_vision_encoder("efficientnet_lite0", "hub")


# ------------------------------------------------------------------------------------------------ transforms
def test_transforms(packaged, swin_tiny, image_paths):
    img = Image.open(image_paths[0])
    wide = img.resize((96, 64))
    for enc in (packaged, swin_tiny):
        s = enc.image_size
        for train, augment in ((False, False), (True, False), (True, True)):
            tf = image_transform(enc, train=train, augment=augment)
            assert tf(img).shape == tf(wide).shape == (3, s, s)
    ev = image_transform(packaged)
    assert torch.equal(ev(img), ev(img))
    assert torch.equal(ev(img), image_transform(packaged, train=True, augment=False)(img))
    assert ev(img).min() >= -1 and ev(img).max() <= 1  # this encoder normalises with mean = std = 0.5
    aug = image_transform(packaged, train=True, augment=True)
    views = [aug(img) for _ in range(4)]
    assert not all(torch.equal(views[0], v) for v in views[1:])


# ---------------------------------------------------------------------------------------------- feature cache
def test_feature_cache_round_trip(packaged, random_effnet, image_paths, pixels, tmp_path):
    images = {f"img{i}": p for i, p in enumerate(image_paths[:3])}  # paths
    images["pil"] = Image.open(image_paths[3])
    images["tensor"] = pixels[4]  # already preprocessed
    feats = encode_images(packaged, images, batch_size=2, progress=False)
    assert list(feats) == ["img0", "img1", "img2", "pil", "tensor"]
    assert feats["img0"].shape == (49, 1280) and feats["img0"].dtype == torch.float16
    direct = packaged(pixels[:5]).float()
    for i, key in enumerate(feats):
        torch.testing.assert_close(feats[key].float(), direct[i], rtol=2e-3, atol=2e-3)

    path = tmp_path / "feats.safetensors"
    meta = feature_meta(packaged)
    save_features(path, feats, meta)
    loaded = load_features(path, meta)
    assert list(loaded) == list(feats) and all(torch.equal(loaded[k], feats[k]) for k in feats)
    with pytest.raises(FeatureCacheMismatch, match="fingerprint: cache has .*delete it"):
        load_features(path, feature_meta(random_effnet))
    with pytest.raises(FeatureCacheMismatch, match="dtype"):
        load_features(path, feature_meta(packaged, torch.float32))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FeatureCacheMismatch, match="not a feature cache"):
        load_features(tmp_path / "other.safetensors", meta)


def test_cached_features_reads_then_extends(packaged, image_paths, tmp_path, monkeypatch):
    path = tmp_path / "cache.safetensors"
    first = cached_features(path, packaged, image_paths[:2], progress=False)  # keys 0, 1
    encoded = []
    real = vision.encode_images
    monkeypatch.setattr(vision, "encode_images",
                        lambda enc, imgs, **kw: encoded.append(sorted(kw["skip"])) or real(enc, imgs, **kw))
    again = cached_features(path, packaged, image_paths[:3], progress=False)
    assert encoded == [[0, 1]]  # the first two came from the file
    assert list(load_features(path)) == [0, 1, 2]
    assert torch.equal(again[0], first[0])


# -------------------------------------------------------------------------------------------------- projector
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projector(kind):
    proj = Projector(1280, 64, kind=kind, dropout=0.5)
    x = torch.randn(2, 49, 1280, dtype=torch.float16)
    assert proj(x).shape == (2, 49, 64) and proj(x).dtype == torch.float32
    proj.eval()
    torch.testing.assert_close(proj(x), proj.proj(x.float()))  # no dropout in eval
    proj.train()
    assert not torch.equal(proj(x), proj(x))  # dropout in train
    assert Projector(8, 4).dropout.p == 0.1  # the paper's default


def test_projector_unknown_kind():
    with pytest.raises(ValueError, match="unknown projector kind 'conv'; known: linear, mlp"):
        Projector(8, 4, kind="conv")
