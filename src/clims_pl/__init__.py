"""clims-pl: CLIMS (Cross Language Image Matching) for weakly supervised semantic segmentation."""

__version__ = "0.1.0"
