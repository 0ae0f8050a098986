"""Developer tools kept outside the installed package: the toy zoo's trainers (:mod:`tools.zoo`) and checks."""
