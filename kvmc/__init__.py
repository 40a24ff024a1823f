"""kvmc: OCI container images run as lightweight microVMs, one VM per container."""

__version__ = "0.1.0"
