import pytest
import torch
from torch import nn

from bayesprune.experiments.models import (
    CNN,
    FCN,
    MLP,
    MODELS,
    LeNet5,
    LeNet5Caffe,
    build_model,
    cifar_resnet18,
    torchvision_model,
)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["mlp", "lenet5", "fcn", "cnn", "resnet18-cifar"])
@pytest.mark.parametrize("channels,size", [(1, 32), (3, 32), (1, 8)])
def test_output_shapes(name, channels, size):
    torch.manual_seed(0)
    kwargs = {"width": 16, "extra_layers": 1} if name == "mlp" else {}
    model = build_model(name, in_channels=channels, image_size=size, num_classes=7, **kwargs)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)


def test_lenet5_parameter_count_hand_computed():
    # conv1: 1*6*25 + 6; conv2: 6*16*25 + 16; fc1: 16*5*5*120 + 120; fc2: 120*84 + 84; fc3: 84*10 + 10
    expected = (150 + 6) + (2400 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert expected == 61706
    model = LeNet5(in_channels=1, num_classes=10, image_size=32)
    assert n_params(model) == expected
    assert model.padding == 0 and model.feature_size == 5


def test_lenet5_scales_with_channels_and_small_images():
    m3 = LeNet5(in_channels=3, num_classes=10)
    convs = [m for m in m3 if isinstance(m, nn.Conv2d)]
    linears = [m for m in m3 if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [18, 48]
    assert [(l.in_features, l.out_features) for l in linears] == [(48 * 25, 360), (360, 252), (252, 10)]
    m8 = LeNet5(in_channels=1, num_classes=10, image_size=8)
    assert m8.padding == 2 and m8.feature_size == 2
    assert [l.in_features for l in m8 if isinstance(l, nn.Linear)][0] == 16 * 2 * 2


def test_lenet5_caffe_is_sbps_20_50_800_500_network():
    # SBP's "LeNet5 20-50-800-500" on 28x28 MNIST: conv1 1*20*25 + 20; conv2 20*50*25 + 50;
    # fc1 800*500 + 500; fc2 500*10 + 10
    expected = (500 + 20) + (25000 + 50) + (800 * 500 + 500) + (500 * 10 + 10)
    assert expected == 431080
    model = build_model("lenet5-caffe", in_channels=1, image_size=28, num_classes=10)
    assert isinstance(model, LeNet5Caffe) and n_params(model) == expected
    assert [l.in_features for l in model if isinstance(l, nn.Linear)] == [800, 500]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert LeNet5Caffe(image_size=32).feature_size == 5  # the BMRS protocol's 32x32 images
    with pytest.raises(ValueError, match="image_size=12 is too small for LeNet5Caffe"):
        LeNet5Caffe(image_size=12)


def test_mlp_depth_width_and_activation_instances():
    model = MLP(784, 10, width=100, extra_layers=7)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    tanhs = [m for m in model if isinstance(m, nn.Tanh)]
    assert len(linears) == 7 + 2
    assert len(tanhs) == 7 + 1
    assert len({id(t) for t in tanhs}) == len(tanhs)  # one activation instance per use
    assert linears[0].in_features == 784
    assert all(l.out_features == 100 for l in linears[:-1])
    assert linears[-1].out_features == 10
    assert isinstance(model[0], nn.Flatten)
    # every Linear except the last is directly followed by its activation
    mods = list(model)
    for i, m in enumerate(mods[:-1]):
        if isinstance(m, nn.Linear):
            assert isinstance(mods[i + 1], nn.Tanh)
    relu_mlp = MLP(10, 2, width=5, extra_layers=0, activation=nn.ReLU)
    assert sum(isinstance(m, nn.ReLU) for m in relu_mlp) == 1


def test_fcn_and_cnn_structure():
    fcn = FCN(784, 10)
    assert [l.out_features for l in fcn if isinstance(l, nn.Linear)] == [256, 128, 10]
    assert FCN(64, 10, hidden=(32, 16)).hidden == (32, 16)
    cnn = CNN(1, 10, image_size=28)
    convs = [m for m in cnn if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(32, (3, 3), (1, 1)), (64, (3, 3), (1, 1))]
    assert [l.in_features for l in cnn if isinstance(l, nn.Linear)] == [64 * 7 * 7, 128]


def test_cifar_resnet18_stem():
    model = cifar_resnet18(num_classes=10, in_channels=1)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 10


def test_torchvision_model_random_init_and_channels():
    model = torchvision_model("mobilenet_v3_small", num_classes=5, in_channels=1)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 32))
    assert out.shape == (1, 5)
    tv = build_model("tv:squeezenet1_1", in_channels=3, image_size=32, num_classes=4)
    tv.eval()
    with torch.no_grad():
        assert tv(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_torchvision_head_replacement_without_download(monkeypatch):
    # Simulate a pretrained 1000-class model without downloading anything.
    import torchvision

    real_get_model = torchvision.models.get_model

    def fake_get_model(name, weights=None, **kw):
        return real_get_model(name, weights=None, **kw)

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    model = torchvision_model("resnet18", num_classes=3, in_channels=2, weights="FAKE")
    assert model.fc.out_features == 3
    assert model.conv1.in_channels == 2


def test_error_messages():
    with pytest.raises(ValueError) as err:
        build_model("lenet", in_channels=1, image_size=32, num_classes=10)
    msg = str(err.value)
    for name in MODELS:
        assert name in msg
    assert "tv:" in msg and "lenet5" in msg
    with pytest.raises(ValueError, match="resnet18"):
        torchvision_model("resnet-18", num_classes=10)
    with pytest.raises(ValueError, match="unknown torchvision model"):
        build_model("tv:not_a_model", in_channels=3, image_size=32, num_classes=10)
    with pytest.raises(ValueError):
        MLP(10, 2, extra_layers=-1)
    with pytest.raises(ValueError):
        LeNet5(1, 10, image_size=3)
