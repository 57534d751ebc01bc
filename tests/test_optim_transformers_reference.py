"""The optimizer settings that share a name with `transformers.TrainingArguments` against transformers and PyTorch
themselves (docs/porting.md, "What is the same"): each schedule's rate at every update against
`transformers.get_scheduler`, AdamW and SGD with the Trainer's decay groups and clipping against `torch.optim` and
`torch.nn.utils.clip_grad_norm_`, Adafactor against `transformers.Adafactor`, Lion against its paper's update, and
the parameters weight decay leaves out against `Trainer.get_decay_parameter_names` for every supported family: a few
updates of a tiny least-squares problem. And the rates a run logs, with gradient accumulation and a resume, against
the Trainer's scheduler."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from easytrain import TrainingArguments
from easytrain.models.families import SUPPORTED_MODEL_TYPES
from easytrain.models.hf_io import hf_name, shape_only_model
from easytrain.optim import build_optimizer, build_schedule, decay_mask
from model_configs import family_config
from runs import StopAt
from test_foundation import regression_trainer
from test_trainer import logged, tiny_args

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

#: easytrain's schedule names and transformers' for the same curve (docs/porting.md, "Schedule names", which the
#: refusal of transformers' names repeats): `polynomial` at its defaults ends at 1e-7 of the peak, not 0.
SCHEDULES = [("linear", "linear"), ("cosine", "cosine"), ("constant", "constant_with_warmup"),
             ("cosine", "cosine_with_restarts"), ("linear", "polynomial")]
UPDATES = 6


def transformers_rates(name: str, warmup: int, total: int) -> list[float]:
    """The rate (peak 1) transformers' scheduler gives each of `total` updates: what `get_last_lr` reads before the
    update, the one the Trainer applies and logs."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = transformers.get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    rates = []
    for _ in range(total):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize(("ours", "theirs"), SCHEDULES)
def test_every_schedule_gives_transformers_rate_at_every_update(ours, theirs):
    """Warmup 0, 1, a few, half the run, all but one update and the whole run (a longer warmup is cut here and not
    there: docs/porting.md); runs of 1 to 100 updates."""
    for total in (1, 2, 3, 7, 10, 100):
        longest = total if theirs != "polynomial" else total - 1  # transformers' polynomial divides by 0 at total
        for warmup in sorted({0, 1, 3, total // 2, total - 1, total} & set(range(longest + 1))):
            args = TrainingArguments(learning_rate=1.0, warmup_steps=warmup, warmup_ratio=0.0, lr_scheduler_type=ours)
            schedule = build_schedule(args, total)
            assert [float(schedule(k)) for k in range(total)] == pytest.approx(
                transformers_rates(theirs, warmup, total), abs=1e-6), (warmup, total)


@pytest.mark.parametrize(("ours", "theirs"), SCHEDULES[:4])
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_a_warmup_ratio_up_to_the_whole_run_gives_transformers_rate_at_every_update(ours, theirs, ratio):
    """`warmup_ratio` 1.0, accepted by transformers 4 (in [0, 1]; 5 spells a ratio as a `warmup_steps` below 1):
    warmup over the whole run, the last update at (total - 1) / total of the peak, as transformers' scheduler
    gives it for that many warmup updates (its ratio rounds up: the same count at 1.0, and at 0.5 of an even run).
    Not `polynomial`, which divides by a decay of 0 updates there."""
    for total in (2, 10, 100) if ratio < 1 else (1, 2, 7, 100):
        args = TrainingArguments(learning_rate=1.0, warmup_steps=0, warmup_ratio=ratio, lr_scheduler_type=ours)
        schedule = build_schedule(args, total)
        warmup = math.ceil(ratio * total)
        assert [float(schedule(k)) for k in range(total)] == pytest.approx(
            transformers_rates(theirs, warmup, total), abs=1e-6), (ratio, total)


def problem(rows: int = 8, inputs: int = 5, outputs: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """A least-squares problem: a matrix (decayed by both trainers) and a bias (by neither)."""
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in
            dict(w=(inputs, outputs), b=(outputs,), x=(rows, inputs), y=(rows, outputs)).items()}


def train_here(args: TrainingArguments, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """UPDATES updates of easytrain's optimizer and schedule for `args`."""
    tx = build_optimizer(args, build_schedule(args, UPDATES))
    params = {"w": jnp.asarray(data["w"]), "b": jnp.asarray(data["b"])}
    state = tx.init(params)
    loss = lambda p: 10 * jnp.mean((data["x"] @ p["w"] + p["b"] - data["y"]) ** 2)  # noqa: E731
    for _ in range(UPDATES):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    return {name: np.asarray(value) for name, value in params.items()}


def train_torch(make_optimizer, args: TrainingArguments, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same updates as the Trainer makes them: loss, backward, clipping, step, scheduler step."""
    w, b = (torch.nn.Parameter(torch.tensor(data[name])) for name in ("w", "b"))
    optimizer = make_optimizer(w, b)
    scheduler = transformers.get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps,
                                           num_training_steps=UPDATES)
    x, y = torch.tensor(data["x"]), torch.tensor(data["y"])
    for _ in range(UPDATES):
        optimizer.zero_grad()
        (10 * ((x @ w + b - y) ** 2).mean()).backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([w, b], args.max_grad_norm)
        optimizer.step()
        scheduler.step()
    return {"w": w.detach().numpy(), "b": b.detach().numpy()}


def torch_optimizer(args: TrainingArguments):
    """The Trainer's optimizer for `args`, weight decay on the matrix only: AdamW, or SGD (`optim sgd`, with the
    momentum `sgd_momentum` sets here), whose decay is L2 (added to the gradient) in both."""
    def make(w, b):
        groups = [{"params": [w], "weight_decay": args.weight_decay}, {"params": [b], "weight_decay": 0.0}]
        if args.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.sgd_momentum)
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                 eps=args.adam_epsilon)
    return make


@pytest.mark.parametrize(("optimizer", "learning_rate", "momentum"), [("adamw", 0.1, 0.9), ("sgd", 0.01, 0.0),
                                                                     ("sgd", 0.01, 0.9)])
@pytest.mark.parametrize("max_grad_norm", [0.0, 40.0])
def test_adamw_and_sgd_are_torchs_with_the_trainers_decay_groups_and_clipping(optimizer, learning_rate, momentum,
                                                                              max_grad_norm):
    """Betas and epsilon at both defaults, the gradients clipped to `max_grad_norm` before the update (40 clips
    the first three updates here, norms 45, 45, 43, and not the last three, 38 to 30), a linear schedule after
    warmup."""
    args = TrainingArguments(optimizer=optimizer, learning_rate=learning_rate, sgd_momentum=momentum,
                             warmup_steps=2, lr_scheduler_type="linear", weight_decay=0.1, max_grad_norm=max_grad_norm)
    data = problem()
    ours, theirs = train_here(args, data), train_torch(torch_optimizer(args), args, data)
    assert np.abs(ours["w"] - data["w"]).max() > 0.1  # it trained
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], atol=2e-5, err_msg=name)


def test_adafactor_is_transformers_adafactor_with_parameter_scaling():
    """docs/porting.md: easytrain's Adafactor is transformers' `Adafactor(scale_parameter=True, relative_step=False,
    warmup_init=False)` (not the Trainer's, which leaves scale_parameter off) where both factor alike: a matrix whose
    two sides are >= 128 and a vector. Without clipping and decay, which the two define otherwise."""
    args = TrainingArguments(optimizer="adafactor", learning_rate=0.1, warmup_steps=2, lr_scheduler_type="linear",
                             weight_decay=0.0, max_grad_norm=0.0)
    data = problem(inputs=128, outputs=130)

    def adafactor(w, b):
        return transformers.Adafactor([w, b], lr=args.learning_rate, scale_parameter=True, relative_step=False,
                                      warmup_init=False)

    ours, theirs = train_here(args, data), train_torch(adafactor, args, data)
    assert np.abs(ours["w"] - data["w"]).max() > 0.1
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-5, err_msg=name)


def test_lion_is_the_papers_update():
    """No Lion in PyTorch or transformers (the Trainer's is bitsandbytes'): the update of Chen et al. 2023, Algorithm
    2, in NumPy, with `adam_beta1`, `adam_beta2` as its betas and decoupled decay on the matrix only. At this rate
    the gradients change sign between updates, so betas swapped train otherwise."""
    args = TrainingArguments(optimizer="lion", learning_rate=0.1, warmup_steps=2, lr_scheduler_type="linear",
                             weight_decay=0.1, max_grad_norm=0.0)
    data = problem()
    params = {"w": data["w"].astype(np.float64), "b": data["b"].astype(np.float64)}
    momenta, decays = {name: np.zeros_like(value) for name, value in params.items()}, {"w": 0.1, "b": 0.0}
    for rate in np.asarray(transformers_rates("linear", 2, UPDATES)) * args.learning_rate:
        error = data["x"] @ params["w"] + params["b"] - data["y"]
        grads = {"w": 20 * data["x"].T @ error / error.size, "b": 20 * error.sum(0) / error.size}
        for name in params:
            interpolated = args.adam_beta1 * momenta[name] + (1 - args.adam_beta1) * grads[name]
            params[name] = params[name] - rate * (np.sign(interpolated) + decays[name] * params[name])
            momenta[name] = args.adam_beta2 * momenta[name] + (1 - args.adam_beta2) * grads[name]
    ours = train_here(args, data)
    for name in ours:
        np.testing.assert_allclose(ours[name], params[name], atol=1e-5, err_msg=name)


def decayed_names(config, scan_layers: bool) -> set[str]:
    """Hugging Face names of the parameters `decay_mask` decays; a stacked leaf named once per layer."""
    model = shape_only_model(config, jnp.float32, jnp.float32, scan_layers=scan_layers)
    mask = decay_mask(nnx.state(model, nnx.Param).to_pure_dict())
    names = set()
    for path, decayed in jax.tree_util.tree_flatten_with_path(mask)[0]:
        keys = tuple(getattr(key, "key", key) for key in path)
        layers = [keys] if keys[:2] != ("layers", "stacked") else [
            ("layers", i, *keys[2:]) for i in range(config.num_hidden_layers)]
        names.update(hf_name(layer)[0] for layer in layers if decayed)
    return names


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
@pytest.mark.parametrize("tied", [False, True])
def test_weight_decay_leaves_out_what_the_trainer_leaves_out(model_type, tied):
    """By shape here, by name there (`bias`, `norm`): the same parameters for each family (biases, q/k norms and
    sliding windows on), embeddings and the head decayed in both, with layers stacked or not."""
    config = family_config(model_type, tie_word_embeddings=tied)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(config)
    names = {name for name, _ in reference.named_parameters()}
    theirs = set(transformers.Trainer.get_decay_parameter_names(None, reference)) & names
    assert theirs < names  # the norms are left out
    for scan_layers in (False, True):
        assert decayed_names(config, scan_layers) == theirs, scan_layers


def test_a_run_with_accumulation_and_a_resume_logs_the_trainers_rate_at_every_update(tmp_path):
    """Two micro-batches an update (a schedule counting them would be twice as long), `cosine` with 2 warmup
    updates over 7, stopped after update 4 and resumed: each logged rate is the one transformers' scheduler gives
    that update."""
    common = dict(max_steps=7, save_strategy="steps", save_steps=3, learning_rate=1e-2, gradient_accumulation_steps=2,
                  lr_scheduler_type="cosine", warmup_steps=2)
    regression_trainer(tiny_args(tmp_path, **common), callbacks=[StopAt(4)]).train()
    regression_trainer(tiny_args(tmp_path, resume_from_checkpoint="latest", **common)).train()
    rates = logged(tmp_path / "run", key="learning_rate")
    assert sorted(rates) == list(range(1, 8))
    expected = [1e-2 * rate for rate in transformers_rates("cosine", 2, 7)]
    assert [rates[step] for step in range(1, 8)] == pytest.approx(expected, rel=1e-6, abs=1e-9)
