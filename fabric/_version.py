"""The package version, in one place (SemVer; services report it in $SRV.INFO)."""

__version__ = "0.1.0"
