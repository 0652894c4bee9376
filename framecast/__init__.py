"""framecast: tiny text-to-video diffusion toolkit."""
