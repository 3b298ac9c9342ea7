"""NVlabs/edm2 network pickles (the magnitude-preserving U-Net of Karras et al. 2024) as diffscore modules."""
