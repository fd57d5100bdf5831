"""One module per CLI command; each defines ``register(subparsers)``. The CLI stays thin: commands parse
arguments, build configs and call the Python API."""

COMMAND_MODULES = (
    "darkminer.commands.demo",
    "darkminer.commands.generate",
    "darkminer.commands.erase",
    "darkminer.commands.attack",
    "darkminer.commands.evaluate",
    "darkminer.commands.benchmark",
    "darkminer.commands.report",
    "darkminer.commands.export",
    "darkminer.commands.prompts",
    "darkminer.commands.testbed",
)
