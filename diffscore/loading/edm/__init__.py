"""Everything about NVlabs/edm's network pickles: reading them without running them (pickle.py), mapping their
networks onto diffscore's (song.py: SongUNet -> UNet, dhariwal.py: DhariwalUNet -> ADMUNet, options.py: EDM's
constructor arguments) and the loaded model they become (network.py)."""
