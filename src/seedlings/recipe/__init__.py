"""The recipe: typed keys with units, ranges and roles (schema), read from YAML with key=value overrides (load)."""
