"""auto-gptq 0.7.1 on CPU: does its QuantLinear forward work for in_features=576 with g128 / g64?"""
import torch
from auto_gptq.utils.import_utils import dynamically_import_QuantLinear
for gs in (128, 64, 32):
    for desc_act in (False, True):
        QL = dynamically_import_QuantLinear(use_triton=False, desc_act=desc_act, group_size=gs, bits=4,
                                            disable_exllama=True, disable_exllamav2=True)
        try:
            layer = QL(bits=4, group_size=gs, infeatures=576, outfeatures=1536, bias=False)
            lin = torch.nn.Linear(576, 1536, bias=False).half()
            n_groups = layer.scales.shape[0]
            scales = torch.full((1536, n_groups), 0.01).half().t().contiguous()
            zeros = torch.full((1536, n_groups), 8, dtype=torch.int32).t().contiguous()
            g_idx = torch.tensor([i // gs for i in range(576)], dtype=torch.int32)
            layer.pack(lin, scales.t(), zeros.t(), g_idx)
            y = layer(torch.randn(2, 576).half())
            print(f"g{gs} desc_act={desc_act} {QL.__module__}: OK scales rows {n_groups} out {tuple(y.shape)}")
        except Exception as exc:
            print(f"g{gs} desc_act={desc_act} {QL.__module__}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
