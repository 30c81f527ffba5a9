"""medchain: privacy-preserving collaborative training of medical image classifiers over
several blockchains (a reproduction of Zhang, Wang & Li, 2020/2021, reconstructed from its abstract)."""
import warnings

__version__ = "0.1.0"

# In a notebook kernel without ipywidgets, tqdm.auto falls back to text bars with a TqdmWarning
# that prints the installation's path into every executed notebook; the text bars are what we want.
warnings.filterwarnings("ignore", message="IProgress not found")
