"""The built-in matrix configs (TOML files; ``attnbench run default``). Data only."""
