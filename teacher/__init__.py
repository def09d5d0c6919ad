"""The teacher model: what it is (`config.TeacherConfig`), how it is loaded (`load`: a registered, timm or
torchvision architecture + a local state dict with weights_only=True, or a TorchScript / torch.export file; its
preprocessing resolved; its weights hashed), and the hooks on its classifier head (`hooks`: penultimate features for
feature KD, an fp32 head under bf16 autocast). The cache pass labels with it; online KD runs it live.
"""
