"""The train state and the jitted train and eval steps.

Shapes: B batch, L length, N layers, E experts, M parts of a batch (train.grad_accum_steps).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from minids_jax import sharding
from minids_jax.config import Config
from minids_jax.model import build, lora
from minids_jax.model.layers import adapter_dropout
from minids_jax.training import loss as loss_lib
from minids_jax.training import footprint, optim
from minids_jax.training.packing import Packing, StepState, part_like, with_part


class TrainState(NamedTuple):
    """What a step transforms: the model's and the optimizer's NNX states (sharded arrays).
    The same pair holds their graph definitions and their shardings."""

    model: Any
    optimizer: Any

    @property
    def step(self) -> int:
        """Updates applied so far."""
        return int(self.optimizer["step"][...])


def build_model_and_optimizer(config: Config, platform: str):
    """The model (with adapters if lora.rank) and an optimizer of what trains: every
    parameter, or with adapters only them (lora.trainable)."""
    model = build(config, platform, nnx.Rngs(config.train.seed))
    optimizer = nnx.Optimizer(model, optim.optimizer(config.optim),
                              wrt=lora.trainable(config.lora))
    optimizer.opt_state = nnx.data(jax.tree.map(
        _unlike_its_parameter, optimizer.opt_state,
        is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return model, optimizer


def _unlike_its_parameter(x):
    """An optimizer state's variable as it can be sharded: flax gives each the sharding of its
    parameter, which a state of another shape (Adafactor's factored moments) cannot take, so
    those stay whole; optax.masked's placeholders (Muon's, for what AdamW updates) hold no
    array, and are left bare."""
    if not isinstance(x, nnx.Variable):
        return x
    value = x.get_value()
    if isinstance(value, optax.MaskedNode):
        return value
    axes = x.get_metadata().get("out_sharding")
    if axes and len(axes) != value.ndim:
        x.set_metadata("out_sharding", None)
    return x


def create_train_state(config: Config, mesh, place: bool = True):
    """(graphdefs, state, shardings), each a TrainState; the arrays created sharded (with
    `place=False`, a model made on the host may come back as host arrays, placed by the
    caller: sharding.create_sharded). With checkpoint.init_from, the model's arrays but the
    adapters start as zeros: the base's are restored over them (training/checkpointer.py)."""
    def from_base(module: int, name: str) -> bool:
        return module == 0 and not lora.is_adapter(name.split("'")[-2])

    platform = sharding.mesh_platform(mesh)
    # Whole-model bytes, overestimated (replicated arrays counted on every device).
    per_device = footprint.state_bytes(config, mesh.devices.size, platform)
    size = (sum(per_device["by_dtype"].values()) + per_device["optimizer"]) * mesh.devices.size
    graphdefs, states, shardings = sharding.create_sharded(
        lambda: build_model_and_optimizer(config, platform), mesh, config.mesh.axis_rules,
        restored=from_base if config.checkpoint.init_from else None, size_bytes=size,
        place=place)
    return TrainState(*graphdefs), TrainState(*states), TrainState(*shardings)


def make_train_step(graphdefs: TrainState, packing: Packing, shardings: StepState,
                    config: Config, batch_sharding, loss_chunk: int):
    """The jitted step: (StepState, batch) -> (StepState, metrics), the state donated."""
    lr_schedule = optim.schedule(config.optim)
    update_rule = optim.optimizer(config.optim)
    coefs = (config.train.aux_loss_coef, config.train.sequence_aux_loss_coef,
             config.train.mtp_loss_coef)
    # Adapters leave the base model as it is, its routers' balancing biases included.
    bias_rate = 0.0 if config.lora.rank else config.train.router_bias_rate
    trainable = lora.trainable(config.lora)
    microbatches = config.train.grad_accum_steps

    def gradients(model, batch, dropout_key):
        """(loss, (ce, aux)) and the gradients of what trains, over `microbatches` parts;
        `dropout_key` draws the adapters' dropout masks (lora.dropout)."""
        # Gradients of what trains only: a frozen base costs no gradient memory or work.
        value_and_grad = nnx.value_and_grad(loss_lib.total_loss, has_aux=True,
                                            argnums=nnx.DiffState(0, trainable))

        def grad_fn(*args, key=dropout_key):
            with adapter_dropout(key, config.lora.dropout):
                return value_and_grad(*args)

        if microbatches == 1:
            return grad_fn(model, batch, loss_chunk, *coefs)
        denominators_K = loss_lib.denominators(batch, config.model.mtp_depth)
        # Part m holds rows m, m + A, ...: each device's rows split evenly among the parts.
        parts = jax.tree.map(lambda x: x.reshape(x.shape[0] // microbatches, microbatches,
                                                 *x.shape[1:]).swapaxes(0, 1), batch)

        # An NNX module does not cross into a scan: its arrays do, rebuilt into one inside.
        graphdef, model_state = nnx.split(model)
        leaves, treedef = jax.tree.flatten(model_state)

        def accumulate(summed, part_and_index):
            part, index = part_and_index
            part = jax.lax.with_sharding_constraint(part, batch_sharding)
            part_model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            (loss, (ce, aux)), grads = grad_fn(part_model, part,
                                               loss_chunk, *coefs, denominators_K,
                                               microbatches,
                                               key=jax.random.fold_in(dropout_key, index))
            summed = jax.tree.map(lambda total, g: total + g.astype(jnp.float32), summed, grads)
            return summed, (loss, ce, aux)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32),
                             nnx.state(model, trainable))
        grads, (losses, ces, auxs) = jax.lax.scan(accumulate, zeros,
                                                  (parts, jnp.arange(microbatches)))
        return (jnp.sum(losses), (jnp.sum(ces), merge_parts(auxs))), grads

    @sharding.under_mesh(batch_sharding.mesh, config.mesh.axis_rules)
    def train_step(state: StepState, batch):
        model = nnx.merge(graphdefs.model, packing.unpack(state.model))
        lr = lr_schedule(state.step)
        # Masks that depend on the seed and the step only: a resumed run draws the same.
        dropout_key = jax.random.fold_in(jax.random.key(config.train.seed), state.step)
        (loss, (ce, aux)), grads = gradients(model, batch, dropout_key)
        grads = packing.pack(nnx.as_pure(grads))
        params = part_like(state.model, grads)
        updates, opt_state = update_rule.update(grads, state.opt_state, params)
        metrics = {
            "loss": ce, "total_loss": loss, "aux_loss": aux["aux_loss"], "lr": lr,
            "grad_norm": optax.tree.norm(grads), "sequence_aux_loss": aux["sequence_aux_loss"],
            "expert_load": aux["expert_load_NxE"], "dropped_fraction": aux["dropped_fraction"],
            **update_router_biases(model, aux["expert_load_NxE"], bias_rate),
            **({"mtp_loss": aux["mtp_loss"]} if "mtp_loss" in aux else {}),
        }
        # The model's state after the step (its balancing biases moved) with the update.
        model_state = with_part(packing.pack(nnx.as_pure(nnx.state(model))),
                                optax.apply_updates(params, updates))
        return StepState(model_state, opt_state, state.step + 1), metrics

    return jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=0)


def merge_parts(auxs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The aux of a batch from its M parts' (each value stacked on a leading axis of M): the
    MTP loss, a share of the batch's, and the scored tokens add up; each layer's expert load
    is its parts' weighted by their scored tokens (the batch's own share, with a part of
    padding counting for nothing); the other statistics are averaged."""
    merged = {key: (jnp.sum(v, 0) if key in ("mtp_loss", "scored_tokens_N") else jnp.mean(v, 0))
              for key, v in auxs.items()}
    tokens_MxNx1 = auxs["scored_tokens_N"][..., None]
    merged["expert_load_NxE"] = (jnp.sum(auxs["expert_load_NxE"] * tokens_MxNx1, 0)
                                 / jnp.maximum(jnp.sum(tokens_MxNx1, 0), 1.0))
    return merged


def update_router_biases(model, load_NxE: jax.Array, rate: float) -> dict[str, jax.Array]:
    """DeepSeek-V3's aux-loss-free balancing, after the optimizer step: each MoE layer's bias
    (the MTP modules' too) moves by `rate` toward balance, bias_e += rate * sign(1/E - load_e),
    from this step's assignment shares over the whole batch (all devices and processes:
    `load_NxE` is global). Returns the biases' range for the metrics ({} without biases)."""
    biases = model.router_biases()
    if not biases:
        return {}
    # The rows of load_NxE are the MoE layers, the MTP modules' last (loss.model_loss).
    assert len(biases) == load_NxE.shape[0], (len(biases), load_NxE.shape)
    for bias, load_E in zip(biases, load_NxE):
        # set_value, not `bias[...] =`: flax's indexed assignment reads the new value's
        # `.sharding`, which on a tracer costs time in proportion to everything traced so far
        # (0.33 s a layer at 32 layers: 11 of the 16 s of tracing the step).
        bias.set_value(bias[...] + rate * jnp.sign(1.0 / load_E.shape[-1] - load_E))
    values = jnp.stack([bias[...] for bias in biases])
    return {"router_bias_min": jnp.min(values), "router_bias_max": jnp.max(values)}


def make_eval_step(graphdefs: TrainState, packing: Packing, shardings: StepState,
                   batch_sharding, axis_rules, loss_chunk: int):
    """(summed cross-entropy, scored tokens) of a batch: batches with fewer scored tokens (a
    short answer, a padded row) then weigh less in the mean over batches."""
    @sharding.under_mesh(batch_sharding.mesh, axis_rules)
    def eval_step(model_state, batch):
        model = nnx.merge(graphdefs.model, packing.unpack(model_state))
        summed = loss_lib.model_loss(model, batch, loss_chunk, with_mtp=False,
                                     denominators_K=jnp.ones(1))[0]
        return summed, jnp.sum(loss_lib.ahead_weights(batch, 0))

    return jax.jit(eval_step, in_shardings=(shardings.model, batch_sharding))
