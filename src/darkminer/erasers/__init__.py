"""The built-in erasers: each is registered by its module, imported when its name is first looked up."""

# name -> the module that registers it; in the order `darkminer erase --help` lists them
BUILTIN_ERASERS = {
    "darkminer": "darkminer.erasers.darkminer",
    "esd-u": "darkminer.erasers.esd",
    "esd-x": "darkminer.erasers.esd",
    "esd-x-strict": "darkminer.erasers.esd",
    "uce": "darkminer.erasers.uce",
    "ca": "darkminer.erasers.ca",
    "fmn": "darkminer.erasers.fmn",
    "sld": "darkminer.erasers.sld",
    "rece": "darkminer.erasers.rece",
    "advunlearn": "darkminer.erasers.advunlearn",
}
