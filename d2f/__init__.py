"""d2f: Discrete Diffusion Forcing for diffusion LMs (LLaDA, Dream): training and fast decoding."""
__version__ = "0.1.0"
