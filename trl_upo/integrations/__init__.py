"""Integrations of UPO into other training frameworks.

``trl_upo.integrations.axolotl``: an axolotl plugin (``plugins: [trl_upo.integrations.axolotl.UPOPlugin]`` in an
axolotl config with ``rl: dpo``). Importing this package imports no framework; each integration imports its
framework only when its names are first used.
"""
