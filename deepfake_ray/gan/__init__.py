"""The DCGAN: its training (`train-gan`) and making the fakes (`generate`)."""
