"""The 12 sub-networks share one copy of the weights, and every slice they use is a contiguous
leading block of a parameter's storage (so a sliced matmul runs at dense speed)."""

from __future__ import annotations

import gc

import torch
from torch.overrides import TorchFunctionMode

from model.config import DynaBertConfig, TaskSpec
from model.modeling import DynaBertModel

TASK = TaskSpec(type="classification", labels=("a", "b"))
CFG = DynaBertConfig(
    vocab_size=200,
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    ffn_size=256,
    max_positions=64,
    dropout=0.0,
    attention_dropout=0.0,
    task=TASK,
)
MATMULS = {  # every op through which a weight or bias can enter the computation
    torch.nn.functional.linear,
    torch.addmm,
    torch.Tensor.addmm,
    torch.Tensor.addmm_,
    torch.add,
    torch.Tensor.add,
    torch.Tensor.__add__,
    torch.Tensor.__radd__,
    torch.mm,
    torch.matmul,
    torch.bmm,
    torch.baddbmm,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
}
LAYER_WEIGHTS = (
    "qkv_weight",
    "qkv_bias",
    "attn_out_weight_t",
    "attn_out_bias",
    "ffn_in_weight",
    "ffn_in_bias",
    "ffn_out_weight_t",
    "ffn_out_bias",
)


class WeightUses(TorchFunctionMode):
    """Records every tensor argument of a matmul-like call that lives in a parameter's storage,
    and every tensor argument that does not (activations, or a weight *copy*)."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        super().__init__()
        self.by_storage = {p.untyped_storage().data_ptr(): n for n, p in params.items()}
        self.uses: list[tuple[str, torch.Tensor]] = []
        self.others: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS:
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, torch.Tensor):
                    name = self.by_storage.get(a.untyped_storage().data_ptr())
                    if name is not None:
                        self.uses.append((name, a))
                    else:
                        self.others.append(a)
        return func(*args, **kwargs)


def _live_tensor_bytes() -> int:
    """Bytes of every distinct storage held by a live Python tensor object."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type != "meta":
            s = obj.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, CFG.vocab_size, (2, 13))  # B*T = 26: no weight slice has 26 rows
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    return ids, mask


def test_subnetworks_allocate_no_weight_copies() -> None:
    torch.manual_seed(0)
    model = DynaBertModel(CFG).eval()
    ids, mask = _inputs()
    params = dict(model.named_parameters())
    ptrs = {
        n: (p.data_ptr(), p.untyped_storage().data_ptr(), p.untyped_storage().nbytes())
        for n, p in params.items()
    }
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_names = set(model.state_dict())
    with torch.inference_mode():
        model(ids, mask)  # warm-up: lazily created caches of the full network are not copies
    base = _live_tensor_bytes()
    with torch.inference_mode():
        for w, d in CFG.subnetworks():
            model(ids, mask, width=w, depth=d)
            model(ids, None, width=w, depth=d)
    grown = _live_tensor_bytes() - base
    # the smallest weight slice any sub-network uses: a quarter of one attention output projection
    smallest_slice = CFG.num_kept_heads(0.25) * CFG.head_size * CFG.hidden_size * 4
    assert grown < smallest_slice, f"live tensors grew by {grown} bytes after running the 12 sub-networks"
    assert dict(model.named_parameters()).keys() == params.keys()
    assert set(model.state_dict()) == state_names
    assert not list(model.buffers()) or sum(b.numel() for b in model.buffers()) == 0
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == n_bytes
    for n, p in model.named_parameters():
        assert (p.data_ptr(), p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) == ptrs[n], n


def test_live_tensor_check_would_catch_a_copy() -> None:
    """The measurement above is sensitive enough: one cached weight slice copy shows."""
    torch.manual_seed(0)
    model = DynaBertModel(CFG).eval()
    base = _live_tensor_bytes()
    k = CFG.num_kept_heads(0.25) * CFG.head_size
    model._cache = model.layers[0].attn_out_weight_t[:k].clone()  # what a careless cache would do
    assert _live_tensor_bytes() - base >= CFG.num_kept_heads(0.25) * CFG.head_size * CFG.hidden_size * 4


def test_every_slice_is_a_contiguous_leading_view_of_the_shared_storage() -> None:
    torch.manual_seed(0)
    model = DynaBertModel(CFG).eval()
    params = dict(model.named_parameters())
    ids, mask = _inputs()
    storages_per_param: dict[str, set[int]] = {}
    for w, d in CFG.subnetworks():
        rec = WeightUses(params)
        with torch.inference_mode(), rec:
            model(ids, mask, width=w, depth=d)
        used = {name for name, _ in rec.uses}
        for i in CFG.kept_layers(d):  # every weight of every kept layer is seen, none of the others
            assert {f"layers.{i}.{n}" for n in LAYER_WEIGHTS} <= used, (w, d, i)
        for i in set(range(CFG.num_layers)) - set(CFG.kept_layers(d)):
            assert not any(u.startswith(f"layers.{i}.") for u in used), (w, d, i)
        k, n = CFG.num_kept_heads(w), CFG.num_kept_neurons(w)
        a = k * CFG.head_size
        want_rows = {"qkv_weight": 3 * a, "qkv_bias": 3 * a, "attn_out_weight_t": a, "ffn_in_weight": n}
        want_rows |= {"ffn_in_bias": n, "ffn_out_weight_t": n, "attn_out_bias": CFG.hidden_size}
        want_rows |= {"ffn_out_bias": CFG.hidden_size}
        for name, t in rec.uses:
            p = params[name]
            assert t.is_contiguous(), f"{name} slice at ({w}, {d}) is not contiguous: stride {t.stride()}"
            assert t.storage_offset() == p.storage_offset(), f"{name} slice does not start at row 0"
            assert t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
            short = name.split(".", 2)[-1]
            if name.startswith("layers.") and short in want_rows:
                assert t.shape[0] == want_rows[short], (name, w, d, tuple(t.shape))
            storages_per_param.setdefault(name, set()).add(t.untyped_storage().data_ptr())
        # no weight-sized tensor outside the parameters' storage took part in a matmul
        weight_shapes = {tuple(t.shape) for name, t in rec.uses if t.ndim == 2 and name.startswith("layers.")}
        assert not [tuple(o.shape) for o in rec.others if o.ndim == 2 and tuple(o.shape) in weight_shapes]
    # all 12 sub-networks read one storage per parameter
    assert all(len(s) == 1 for s in storages_per_param.values())
