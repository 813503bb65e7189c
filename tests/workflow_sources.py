"""The example workflows in API form: the source from which workflows/*.json (UI form) are made, and what
the end-to-end tests compare the shipped files with. Model file names are those of the real releases."""

from sf_core.train.cli import WAN_NEGATIVE_PROMPT

DIT = "self_forcing_dmd.safetensors"  # `python -m sf_core convert self_forcing_dmd.pt self_forcing_dmd.safetensors`
DIT_PT = "self_forcing_dmd.pt"  # the official checkpoint, read by Load Self-Forcing Model
TEACHER = "wan2.1_t2v_1.3B_fp16.safetensors"
TE = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "wan_2.1_vae.safetensors"
PROMPT = ("A red fox trots through fresh powder snow in a sunlit pine forest, its breath visible in the cold air, "
          "low golden morning light, shallow depth of field, the camera tracks alongside at the fox's height.")

SAMPLER = {
    "seed": 42, "width": 832, "height": 480, "length": 81, "frames_per_chunk": 3,
    "denoising_steps": "1000,750,500,250", "shift": 5.0, "window": 0, "sink": 0, "sink_positions": "adjacent", "fps": 16.0,
}


def _save(video_ref, prefix):
    return {"class_type": "SaveVideo", "inputs": {"video": video_ref, "filename_prefix": prefix, "format": "auto", "codec": "auto"}}


WORKFLOWS = {
    "self_forcing_text_to_video": {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": DIT, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": TE, "type": "wan", "device": "default"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": PROMPT}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "5": {"class_type": "SelfForcingStreamSampler",
              "inputs": {"model": ["1", 0], "positive": ["3", 0], "vae": ["4", 0], **SAMPLER}},
        "6": _save(["5", 2], "self_forcing/t2v"),
    },
    "self_forcing_long_video_prompt_timeline": {
        "1": {"class_type": "SelfForcingLoadModel", "inputs": {"model_name": DIT_PT, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": TE, "type": "wan", "device": "default"}},
        "3": {"class_type": "SelfForcingPromptTimeline", "inputs": {"clip": ["2", 0], "switch": "recache", "timeline": (
            "0s: " + PROMPT + "\n"
            "6s: The fox stops on a snowy ridge and looks straight into the camera, wind lifting powder snow around it.\n"
            "12s: The fox leaps into a deep snow bank and disappears, snow spraying into the golden light.\n"
            "18s: Wide shot of the empty snowy forest as the sun rises above the pines.")}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "5": {"class_type": "SelfForcingStreamSampler",
              "inputs": {"model": ["1", 0], "timeline": ["3", 0], "vae": ["4", 0],
                         **{**SAMPLER, "length": 385, "window": 12, "sink": 3}, "return_all": False}},
        "6": _save(["5", 2], "self_forcing/long"),
    },
    "self_forcing_image_to_video": {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": DIT, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": TE, "type": "wan", "device": "default"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text":
              "The scene comes alive: gentle wind moves through the trees and the camera slowly pushes in."}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "start_frame.png"}},
        "6": {"class_type": "SelfForcingStreamSampler",
              "inputs": {"model": ["1", 0], "positive": ["3", 0], "vae": ["4", 0], "start_image": ["5", 0], **SAMPLER}},
        "7": _save(["6", 2], "self_forcing/i2v"),
    },
    "self_forcing_train_lora": {
        "1": {"class_type": "SelfForcingLoadModel", "inputs": {"model_name": DIT_PT, "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": TEACHER, "weight_dtype": "default"}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": TE, "type": "wan", "device": "default"}},
        "4": {"class_type": "SelfForcingTrainLoRA", "inputs": {
            "model": ["1", 0], "teacher": ["2", 0], "clip": ["3", 0],
            "prompts": PROMPT + "\nA watercolor painting of a lighthouse on a cliff, waves crashing, soft pastel sky.",
            "negative_prompt": WAN_NEGATIVE_PROMPT, "lora_name": "self_forcing_style", "iterations": 200, "rank": 32,
            "learning_rate": 1e-4, "critic_learning_rate": 2e-5, "critic_ratio": 5, "guidance": 3.0,
            "width": 832, "height": 480, "length": 81, "frames_per_chunk": 3, "seed": 0,
            "gradient_checkpointing": True, "resume": True, "save_every": 50}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": PROMPT}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "8": {"class_type": "SelfForcingStreamSampler",
              "inputs": {"model": ["4", 0], "positive": ["6", 0], "vae": ["7", 0], **SAMPLER}},
        "9": _save(["8", 2], "self_forcing/trained"),
    },
}
