"""aldk-tf: light-weight deformable 3-D registration distilled from a cascaded teacher."""

__version__ = "0.1.0"
