"""Attacks on erased models: each is registered by its module, imported when its name is first looked up."""

# name -> the module that registers it; in the order `darkminer attack --help` lists them
BUILTIN_ATTACKS = {
    "unlearndiff": "darkminer.attacks.unlearndiff",
    "p4d": "darkminer.attacks.p4d",
    "ringabell": "darkminer.attacks.ringabell",
    "cce": "darkminer.attacks.cce",
    "plain": "darkminer.attacks.prompts",
    "paraphrase": "darkminer.attacks.prompts",
}
