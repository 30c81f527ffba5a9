"""medchain: privacy-preserving collaborative training of medical image classifiers over
several blockchains (a reproduction of Zhang, Wang & Li, 2020/2021, reconstructed from its abstract)."""

__version__ = "0.1.0"
