"""payguard: money-moving flows made safe."""
