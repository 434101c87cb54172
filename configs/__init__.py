"""The shipped YAML configs, installed as the data package ``dynamoe.configs``."""
