"""ZeroQuant's recipes: W8A8, and W4/8 with and without layer-by-layer knowledge distillation (LKD).

W4/8 (ZeroQuant, section 5): MLP weights 4-bit, attention weights 8-bit, both symmetric and group-wise along the
input dim (group 128, a shorter last group where 128 does not divide the width, e.g. SmolLM2's 576 = 4x128 + 64).
A16: activations stay float (weight-only linears); A8: int8 activations with one dynamic scale per token on every
block linear (the integer path of ops.qdot). LKD recipes train each block's fake-quantized copy against the float
block (jaxquant.methods.lkd) before quantizing it for real; their defaults are lkd.BUDGET (sized for a 2-core CPU;
ZeroQuant's reference settings are lkd.REFERENCE).

W8A8 (section 4): int8 weights group-wise along the input dim, int8 activations with one dynamic scale per token
(as published) or per token and K-group (-kgroup). `RECIPES` lists them all; jaxquant.recipes registers them.
"""

from __future__ import annotations

import dataclasses

from jaxquant.methods.lkd import BUDGET, LKDProcedure
from jaxquant.quantizers import WeightQuant
from jaxquant.rules import ATTN_LINEARS, BLOCK_LINEARS, MLP_LINEARS, Recipe, Rule

GROUP_SIZE = 128


def w4(group_size: int = GROUP_SIZE) -> WeightQuant:
  return WeightQuant(bits=4, symmetric=True, granularity="group", group_size=group_size)


def w8(group_size: int = GROUP_SIZE) -> WeightQuant:
  return WeightQuant(bits=8, symmetric=True, granularity="group", group_size=group_size)


def w48_rules(activation: str | None = None) -> tuple[Rule, ...]:
  """MLP linears 4-bit, attention linears 8-bit; `activation` ("token" or None) on both."""
  return (Rule(MLP_LINEARS, w4(), activation=activation), Rule(ATTN_LINEARS, w8(), activation=activation))


def w4_rules(activation: str | None = None) -> tuple[Rule, ...]:
  return (Rule(BLOCK_LINEARS, w4(), activation=activation),)


W48A16 = w48_rules()
W48A8 = w48_rules("token")
W4A16 = w4_rules()

_LKD = ("LKD: each block's fake-quantized copy is trained (AdamW, MSE to the float block's output on the float "
        "model's input to that block, {steps} steps of {batch} x {seq} tokens a block, lr {lr:g}) before it is "
        "quantized for real")


def _lkd_text(config=BUDGET) -> str:
  return _LKD.format(steps=config.steps, batch=config.batch_size, seq=config.seq_len, lr=config.learning_rate)


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "zeroquant-w8a8",
        "ZeroQuant W8A8: int8 weights group-wise along the input dim (group 128, shorter last group), int8 "
        "activations with one dynamic scale per token; every block linear; integer matmul",
        (Rule(BLOCK_LINEARS, w8(), activation="token"),)),
    Recipe(
        "zeroquant-w8a8-kgroup",
        "ZeroQuant W8A8 with finer activation scales: as zeroquant-w8a8, but one int8 activation scale per token "
        "and per K-group of 128 (the same groups as the weights), applied in the same per-group integer epilogue",
        (Rule(BLOCK_LINEARS, w8(), activation="token_group"),)),
    Recipe(
        "zeroquant-w48a16",
        "ZeroQuant W4/8A16, round-to-nearest: MLP weights int4, attention weights int8 (symmetric, group 128 along "
        "the input dim); activations float", W48A16),
    Recipe(
        "zeroquant-w48a8",
        "ZeroQuant W4/8A8, round-to-nearest: as zeroquant-w48a16, plus int8 activations with one dynamic scale per "
        "token on every block linear", W48A8),
    Recipe(
        "zeroquant-w4a16",
        "ZeroQuant W4A16, round-to-nearest: every block linear int4 (symmetric, group 128 along the input dim)",
        W4A16),
    Recipe(
        "zeroquant-w48a16-lkd",
        "ZeroQuant W4/8A16 with " + _lkd_text() + "; calibration text", W48A16,
        procedure=LKDProcedure(BUDGET), uses_calibration=True),
    Recipe(
        "zeroquant-w48a8-lkd",
        "ZeroQuant W4/8A8 with LKD: as zeroquant-w48a16-lkd, plus int8 token-wise activations on every block linear "
        "(fake-quantized during LKD)", W48A8,
        procedure=LKDProcedure(BUDGET), uses_calibration=True),
    Recipe(
        "zeroquant-w4a16-lkd",
        "ZeroQuant W4A16 with LKD: every block linear int4 (group 128), activations float", W4A16,
        procedure=LKDProcedure(BUDGET), uses_calibration=True),
    Recipe(
        "zeroquant-w48a16-lkd-datafree",
        "ZeroQuant W4/8A16 with LKD and no data: decoders train on sequences sampled from the float model itself, "
        "encoders on random tokens", W48A16,
        procedure=LKDProcedure(dataclasses.replace(BUDGET, data="generated")), uses_calibration=False),
    Recipe(
        "zeroquant-w48a16-lkd-random",
        "ZeroQuant W4/8A16 with LKD on uniformly random tokens (no data)", W48A16,
        procedure=LKDProcedure(dataclasses.replace(BUDGET, data="random")), uses_calibration=False),
)
