"""The hidden-state capture: one forward pre-hook per attention module, shared by every cache.

A scorer reads the attention input of the last token at its target layers. An
:class:`~lsa.cache.LSACache` gets it with a forward pre-hook on those layers' attention modules
(no model code changed). The hook is installed once per module and shared: a cache registers as
a *user* of it (a weak reference, so a cache dropped without ``close()`` leaves nothing behind but
the one shared hook), and the hook writes to the cache that the forward itself runs with (the
module's ``cache=`` / ``past_key_values=`` argument) when that cache is a user. So captures never
mix between caches, whichever thread runs them, and hooks never accumulate. The hook goes away
when the last user is closed. (Within one cache, ``LSACache._capture_hidden`` keeps them per
thread.)
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from torch.utils.hooks import RemovableHandle


@dataclass
class _Shared:
    layer_idx: int
    handle: RemovableHandle
    users: weakref.WeakSet


_lock = threading.Lock()  # guards attach / detach (the hook itself only reads)
_shared: weakref.WeakKeyDictionary[torch.nn.Module, _Shared] = weakref.WeakKeyDictionary()


def _hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    shared = _shared.get(module)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if shared is None or cache is None:
        return None
    try:
        mine = cache in shared.users
    except TypeError:  # an unhashable cache object: not an LSACache
        return None
    if mine:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is not None:
            cache._capture_hidden(shared.layer_idx, hidden)
    return None


def attach(cache: object, modules: dict[int, torch.nn.Module]) -> None:
    """Make ``cache`` a user of the capture hook of each ``layer_idx -> attention module``."""
    with _lock:
        for layer_idx, module in modules.items():
            shared = _shared.get(module)
            if shared is None:
                handle = module.register_forward_pre_hook(_hook, with_kwargs=True)
                shared = _shared[module] = _Shared(layer_idx, handle, weakref.WeakSet())
            shared.users.add(cache)


def detach(cache: object, modules: list[torch.nn.Module]) -> None:
    """Remove ``cache`` from the modules' hooks; a hook left without users is removed."""
    with _lock:
        for module in modules:
            shared = _shared.get(module)
            if shared is None:
                continue
            shared.users.discard(cache)
            if not shared.users:
                shared.handle.remove()
                del _shared[module]
