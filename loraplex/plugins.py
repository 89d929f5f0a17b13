"""General plugins: entry points of group ``loraplex.general_plugins``, each called once.

``LORAPLEX_PLUGINS`` (comma list of entry-point names) picks which run; unset runs all.
This is how the built-in LoRA resolvers and third-party resolvers get registered.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from loraplex import envs

logger = logging.getLogger(__name__)

GROUP = "loraplex.general_plugins"
_loaded: set[str] = set()


class PluginError(RuntimeError):
    """A selected plugin failed to load; the message names it."""


def load_general_plugins() -> list[str]:
    """Call every selected plugin function not called yet; return the names called now."""
    allowed = envs.LORAPLEX_PLUGINS
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if allowed is not None:
        missing = [n for n in allowed if n not in found]
        if missing:
            logger.warning("LORAPLEX_PLUGINS names %s, but no such plugin is installed "
                           "(installed: %s)", ", ".join(missing), ", ".join(sorted(found)))
    called = []
    for name, ep in found.items():
        if (allowed is not None and name not in allowed) or name in _loaded:
            continue
        _loaded.add(name)
        try:
            ep.load()()
        except Exception as e:
            raise PluginError(f"plugin {name!r} ({ep.value}) failed: {e}") from e
        called.append(name)
        logger.info("loaded plugin %s", name)
    return called
