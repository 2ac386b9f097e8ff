"""rethink-tl: does ImageNet transfer learning help on your medical images?"""

__version__ = "0.1.0"
