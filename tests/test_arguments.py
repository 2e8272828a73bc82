"""Trainer arguments: device, optimizers, epochs, loss function and seeds. Each error says
what was wrong, shows the value and gives the fix; tested through ``corolux.Trainer`` where
the trainer already checks the argument, else on the function directly."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
from realdata import iris
from strategies import GanToy

import corolux
from corolux.arguments import check_loss_fn, resolve_device, resolve_epochs, resolve_optimizers

F = torch.nn.functional


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def make_trainer(model: torch.nn.Module | None = None, **kwargs) -> corolux.Trainer:
    kwargs.setdefault("loss_fn", F.cross_entropy)
    kwargs.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.1))
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("progress", False)
    return corolux.Trainer(model if model is not None else mlp(), **kwargs)


# -- seed_everything ---------------------------------------------------------------------------


def test_seed_everything_is_public():
    from corolux.arguments import seed_everything

    assert corolux.seed_everything is seed_everything
    assert "before building the model" in seed_everything.__doc__


def test_seed_everything_seeds_torch_random_and_numpy():
    def draw():
        return torch.rand(3).tolist(), random.random(), np.random.rand()

    corolux.seed_everything(123)
    first = draw()
    corolux.seed_everything(123)
    assert draw() == first
    corolux.seed_everything(124)
    assert draw() != first


def test_seed_everything_makes_model_building_and_training_reproducible():
    x, y = iris()

    def run() -> list[float]:
        corolux.seed_everything(7)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3))
        history = make_trainer(model).fit((x, y), epochs=2)
        return history["train_loss"]

    assert run() == run()


@pytest.mark.parametrize("seed", [-(2**63), 0, 2**64 - 1])
def test_seed_everything_accepts_any_64_bit_int(seed):
    corolux.seed_everything(seed)


@pytest.mark.parametrize("seed", [True, 1.0, "0", None, np.int64(3)])
def test_seed_everything_refuses_a_non_int_with_a_type_error(seed):
    with pytest.raises(TypeError) as info:
        corolux.seed_everything(seed)
    message = str(info.value)
    assert "int" in message
    assert repr(seed) in message  # shows the value
    assert "seed_everything(0)" in message  # and how to call it


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_seed_everything_refuses_a_seed_beyond_64_bits(seed):
    with pytest.raises(ValueError, match=r"64 bits.*" + str(seed)):
        corolux.seed_everything(seed)


# -- epochs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_array", [lambda y: y, lambda y: y.numpy()], ids=["tensor", "numpy"])
def test_fit_x_y_is_a_type_error_that_shows_the_pair_form(as_array):
    x, y = iris()
    with pytest.raises(TypeError) as info:
        make_trainer().fit(x, as_array(y))  # the targets land in epochs
    message = str(info.value)
    assert "epochs" in message
    assert "(150,)" in message  # what epochs got
    assert "fit(x, y)" in message
    assert "fit((x, y), epochs=...)" in message


def test_epochs_as_a_numpy_array_names_numpy():
    with pytest.raises(TypeError, match=r"NumPy array of shape \(4, 2\).*fit\(\(x, y\)"):
        resolve_epochs(np.zeros((4, 2)))


def test_epochs_as_a_zero_d_tensor_says_to_use_int():
    with pytest.raises(TypeError, match=r"0-d Tensor tensor\(3\).*int\(epochs\)"):
        resolve_epochs(torch.tensor(3))


@pytest.mark.parametrize(("epochs", "expected"), [(3, (0, 3)), ((0, 4), (0, 4)), ([2, 2], (2, 2))])
def test_good_epochs_still_resolve(epochs, expected):
    assert resolve_epochs(epochs) == expected


# -- loss_fn -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn", [None, F.cross_entropy, torch.nn.CrossEntropyLoss(), lambda pred, target: pred.sum()]
)
def test_check_loss_fn_returns_a_good_loss_fn(loss_fn):
    assert check_loss_fn(loss_fn) is loss_fn


@pytest.mark.parametrize("cls", [torch.nn.CrossEntropyLoss, torch.nn.MSELoss, torch.nn.BCEWithLogitsLoss])
def test_a_loss_class_is_a_type_error_that_shows_the_instance(cls):
    with pytest.raises(TypeError) as info:
        check_loss_fn(cls)
    message = str(info.value)
    assert f"class {cls.__name__}" in message
    assert "instance" in message
    assert f"loss_fn=nn.{cls.__name__}()" in message


def test_a_user_loss_class_is_shown_by_its_own_name():
    class FocalLoss(torch.nn.Module):
        def forward(self, pred, target):
            return pred.sum()

    with pytest.raises(TypeError, match=r"loss_fn=FocalLoss\(\)"):
        check_loss_fn(FocalLoss)


@pytest.mark.parametrize("bad", ["cross_entropy", 0.5, [F.mse_loss]])
def test_a_loss_fn_that_is_not_callable_is_a_type_error(bad):
    with pytest.raises(TypeError) as info:
        check_loss_fn(bad)
    message = str(info.value)
    assert message.startswith("loss_fn must be callable (pred, target) -> loss, got ")
    assert repr(bad) in message
    assert "torch.nn.functional.cross_entropy" in message  # the fix


def test_a_loss_value_instead_of_the_function_says_so():
    loss = F.mse_loss(torch.zeros(2), torch.ones(2))
    with pytest.raises(TypeError, match=r"not its result"):
        check_loss_fn(loss)


# -- device ------------------------------------------------------------------------------------


def fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def no_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def device_error(monkeypatch: pytest.MonkeyPatch, cuda_devices: int, resolve: Callable[[], object]) -> str:
    """The message of the ValueError that ``resolve()`` raises on a machine faked to have
    ``cuda_devices`` CUDA devices and no MPS; checked to give the fix (device='auto' or 'cpu')."""
    fake_cuda(monkeypatch, cuda_devices)
    no_mps(monkeypatch)
    with pytest.raises(ValueError) as info:
        resolve()
    message = str(info.value)
    assert "device='auto'" in message and "device='cpu'" in message
    return message


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_without_cuda_is_a_value_error_through_the_trainer(monkeypatch, device):
    message = device_error(monkeypatch, 0, lambda: make_trainer(device=device))
    assert f"device={device!r}" in message  # what was asked
    assert "CUDA" in message
    assert "this machine has only the CPU" in message  # what there is


def test_cuda_index_beyond_the_device_count_is_a_value_error(monkeypatch):
    message = device_error(monkeypatch, 2, lambda: resolve_device("cuda:2"))
    assert "device='cuda:2'" in message and "CUDA device 2" in message
    assert "2 CUDA devices (cuda:0 to cuda:1)" in message


def test_an_existing_cuda_device_resolves(monkeypatch):
    fake_cuda(monkeypatch, 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("auto") == torch.device("cuda")


def test_mps_without_mps_is_a_value_error(monkeypatch):
    message = device_error(monkeypatch, 1, lambda: resolve_device("mps"))
    assert "device='mps'" in message and "MPS" in message
    assert "the CPU and 1 CUDA device (cuda:0)" in message


def test_an_available_mps_resolves(monkeypatch):
    pytest.importorskip("torch.backends.mps")
    fake_cuda(monkeypatch, 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    assert resolve_device("auto") == torch.device("mps")


def test_cpu_and_auto_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert make_trainer(device="auto").device.type in ("cpu", "cuda", "mps")


def test_a_device_that_is_no_device_is_still_a_value_error():
    with pytest.raises(ValueError, match=r"'gpu'"):
        resolve_device("gpu")


# -- optimizers --------------------------------------------------------------------------------


def test_an_optimizer_of_another_model_is_a_value_error_through_the_trainer():
    model, other = mlp(), mlp()
    opt = torch.optim.Adam(other.parameters(), lr=1e-3)
    with pytest.raises(ValueError) as info:
        make_trainer(model, optimizer=opt)
    message = str(info.value)
    assert "optimizer (Adam, 4 parameters) holds none of the model's parameters" in message
    assert "never change" in message
    assert "model.parameters()" in message
    assert "optimizer=lambda params: torch.optim.Adam(params, lr=...)" in message


def test_a_factory_that_ignores_its_params_is_a_value_error():
    other = mlp()
    with pytest.raises(ValueError) as info:
        make_trainer(optimizer=lambda params: torch.optim.SGD(other.parameters(), lr=0.1))
    message = str(info.value)
    assert "the factory returned an optimizer (SGD, 4 parameters)" in message
    assert "params it is given" in message
    assert "lambda params: torch.optim.SGD(params, lr=...)" in message


def test_a_foreign_optimizer_in_a_dict_is_named():
    model = GanToy()
    stray = torch.optim.SGD(GanToy().disc.parameters(), lr=0.1)
    with pytest.raises(ValueError) as info:
        make_trainer(
            model, loss_fn=F.mse_loss, optimizer={"gen": lambda p: torch.optim.SGD(p, lr=0.1), "disc": stray}
        )
    message = str(info.value)
    assert "optimizer['disc']" in message
    assert "model.disc.parameters()" in message
    assert "{'disc': lambda params: torch.optim.SGD(params, lr=...), ...}" in message


def test_a_foreign_optimizer_named_after_no_submodule_suggests_the_models_parameters():
    stray = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError) as info:
        resolve_optimizers({"main": stray}, mlp())
    message = str(info.value)
    assert "optimizer['main']" in message and "model.parameters()" in message
    assert "lambda" not in message  # a factory named 'main' would find no submodule


def test_an_optimizer_over_part_of_the_model_is_fine():
    model = mlp()
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    assert make_trainer(model, optimizer=opt).optimizers == {"opt": opt}


def test_an_optimizer_over_the_model_and_extra_parameters_is_fine():
    model = mlp()
    temperature = torch.nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([*model.parameters(), temperature], lr=0.1)
    assert make_trainer(model, optimizer=opt).optimizers == {"opt": opt}


def test_extra_parameters_count_as_the_trainers():
    model = mlp()
    loss = torch.nn.Module()
    loss.temperature = torch.nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)  # trains only the loss's temperature
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        resolve_optimizers(opt, model)
    assert resolve_optimizers(opt, model, extra=loss.parameters()) == {"opt": opt}


def test_parameters_are_compared_by_identity_not_value():
    model = mlp()
    twin = mlp()
    twin.load_state_dict(model.state_dict())  # equal values, other tensors
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        resolve_optimizers(torch.optim.SGD(twin.parameters(), lr=0.1), model)


def test_an_optimizer_of_a_model_built_again_is_refused_before_training():
    """The notebook trap: the model cell is run again after the optimizer was built."""
    x, y = iris()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model = mlp()  # built again; opt still holds the old weights
    with pytest.raises(ValueError, match="built for another model"):
        corolux.fit(model, (x, y), loss_fn=F.cross_entropy, optimizer=opt, device="cpu", progress=False)


# -- through Trainer.__init__ --------------------------------------------------------------------


def test_the_trainer_refuses_a_loss_class():
    with pytest.raises(TypeError, match=r"pass an instance: loss_fn=nn\.CrossEntropyLoss\(\)"):
        make_trainer(loss_fn=torch.nn.CrossEntropyLoss)


class TemperedLoss(torch.nn.Module):
    """Cross-entropy of the logits over a learnable temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.ones(()))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(pred / self.temperature, target)


def test_the_trainer_counts_a_loss_modules_parameters_as_its_own():
    x, y = iris()
    loss = TemperedLoss()
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)  # calibrates the temperature alone
    trainer = make_trainer(loss_fn=loss, optimizer=opt)
    trainer.fit((x, y))
    assert loss.temperature.item() != 1.0
