"""The trainable parameters of a model, seen as one vector that directions act on.

`ParamSpace` applies seeded direction combinations to the weights in place (global
updates: every party runs the same code on the same values and gets the same bits) and
evaluates the model at ``x + precond * sum_t c_t z_t`` *without touching the stored
weights*: forward pre-hooks materialise each module's perturbed parameters just before
the module runs and drop them right after. Peak memory is inference memory plus one
layer's parameters, and the weights are restored exactly because they are never
changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from fedscalar import directions

Term = tuple[int, int, float]
"""(seed, perturbation index, coefficient) of one direction in a combination."""

Precond = Callable[[int, int, int, torch.Tensor], None]
"""``precond(param_index, start, stop, comb)`` rescales a chunk of a combination in place
(HiSo divides by ``sqrt(H + eps)``), chunk by chunk so no model-sized copy is made."""


SMALL = 1 << 16
"""Parameters up to this many elements are perturbed together in one vectorised pass."""


def work_dtype(p: torch.Tensor) -> torch.dtype:
    """Arithmetic precision for a parameter: at least float32 (bf16/fp16 are upcast)."""
    return torch.promote_types(p.dtype, torch.float32)


def copy_flat_(targets: list[torch.Tensor], vec: torch.Tensor) -> None:
    """Copy consecutive slices of the flat ``vec`` into ``targets``, in order."""
    total = sum(t.numel() for t in targets)
    if vec.numel() != total:
        raise ValueError(f"expected {total} values, got {vec.numel()}")
    offset = 0
    with torch.no_grad():
        for t in targets:
            t.copy_(vec[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


class ParamSpace:
    """Ordered view of a model's trainable parameters (``requires_grad=True``)."""

    def __init__(self, model: nn.Module):
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.numel = sum(p.numel() for p in self.params)

    def fingerprint(self) -> str:
        """Hash of names, shapes and dtypes: ledgers refuse to replay onto another layout."""
        h = hashlib.sha256()
        for n, p in zip(self.names, self.params, strict=True):
            h.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
        return h.hexdigest()[:16]

    def digest(self) -> str:
        """SHA-256 of the weights' bytes: proves a rebuilt base model is the same one."""
        h = hashlib.sha256()
        for p in self.params:
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # -- whole-vector helpers ---------------------------------------------------------
    def flat(self) -> torch.Tensor:
        """A float32 copy of all trainable weights as one vector (for small models/tests)."""
        return torch.cat([p.detach().reshape(-1).float().cpu() for p in self.params])

    def load_flat_(self, vec: torch.Tensor) -> None:
        copy_flat_(self.params, vec)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)}

    def load_state_(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"state lacks parameters: {missing[:3]}...")
        with torch.no_grad():
            for n, p in zip(self.names, self.params, strict=True):
                p.copy_(tensors[n])

    # -- seeded directions ------------------------------------------------------------
    def materialize(
        self,
        index: int,
        terms: list[Term],
        precond: Precond | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``w + precond(sum_t c_t z_t)`` for parameter ``index``, in ``out`` if given."""
        p = self.params[index]
        w = p.detach().reshape(-1)
        wd = work_dtype(p)
        if out is None:
            out = torch.empty(p.numel(), dtype=wd, device=p.device)
        for start, stop in directions.chunks(p.numel()):
            if precond is None and w.dtype == wd:  # fused: out = w + c_1 z_1 + ...
                directions.add_combination_(out[start:stop], terms, index, start, w[start:stop])
                continue
            comb = directions.combination(terms, index, start, stop, device=p.device, dtype=wd)
            if precond is not None:
                precond(index, start, stop, comb)
            torch.add(w[start:stop].to(wd), comb, out=out[start:stop])
        return out.to(p.dtype).view_as(p)

    def _materialize_small(
        self, terms: list[Term], precond: Precond | None
    ) -> dict[int, torch.Tensor]:
        """Perturbed copies of all small parameters, one vectorised pass per device/dtype."""
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.params):
            if p.numel() <= SMALL:
                groups.setdefault((p.device, work_dtype(p)), []).append(i)
        out: dict[int, torch.Tensor] = {}
        for (device, dtype), members in groups.items():
            comb = directions.combination_segments(
                terms, [(i, self.params[i].numel()) for i in members], device=device, dtype=dtype
            )
            offset = 0
            for i in members:
                p = self.params[i]
                c = comb[offset : offset + p.numel()]
                offset += p.numel()
                if precond is not None:
                    precond(i, 0, p.numel(), c)
                out[i] = (p.detach().reshape(-1).to(dtype) + c).to(p.dtype).view_as(p)
        return out

    @contextmanager
    def perturbed(self, terms: list[Term], precond: Precond | None = None):
        """Within the block, forward passes see ``x + precond(sum_t c_t z_t)``.

        The stored weights are untouched. Raises if a trainable parameter was not
        reached by a module hook during a forward pass (it would silently stay
        unperturbed).
        """
        if not terms:
            yield
            return
        owners: dict[nn.Module, list[tuple[str, int]]] = {}
        for module in self.model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in self._index:
                    owners.setdefault(module, []).append((name, self._index[id(p)]))
        seen: set[int] = set()
        ran: list[bool] = []
        saved: dict[nn.Module, list[tuple[nn.Parameter, torch.Tensor]]] = {}

        pool: dict[tuple[int, torch.dtype, torch.device], list[torch.Tensor]] = {}
        ready = self._materialize_small(terms, precond)

        def pre_hook(module, _args):
            swaps = []
            for name, i in owners[module]:
                param = getattr(module, name)
                swaps.append((param, param.data))
                if i in ready:
                    param.data = ready[i]
                else:
                    key = (param.numel(), work_dtype(param), param.device)
                    buffer = pool[key].pop() if pool.get(key) else None
                    param.data = self.materialize(i, terms, precond, out=buffer)
                seen.add(i)
            saved[module] = swaps

        def post_hook(module, _args, _out):
            for param, original in saved.pop(module, []):
                used = param.data
                param.data = original
                if used.numel() > SMALL and used.dtype == work_dtype(param):  # reuse the pages
                    pool.setdefault((used.numel(), used.dtype, used.device), []).append(
                        used.view(-1)
                    )

        handles = [self.model.register_forward_hook(lambda *_: ran.append(True))]
        for module in owners:
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()
            for swaps in saved.values():  # a forward that raised midway
                for param, original in swaps:
                    param.data = original
        if ran and len(seen) != len(self.params):
            missed = [self.names[i] for i in range(len(self.params)) if i not in seen]
            raise RuntimeError(
                f"parameters used outside their module's forward cannot be perturbed: {missed}"
            )
