"""The example workflows: the single source from which the template files workflows/<title>.json (UI form, with
a note and model download links) and their thumbnails workflows/<title>.jpg are built (tests/build_workflows.py),
and what the end-to-end tests compare the shipped files with.

ComfyUI lists a custom node pack's templates by file name (the name is the title the template browser shows)
and shows <name>.jpg beside each as its thumbnail. Model file names are those of the real releases, and each
loader node carries `properties.models` (file, published URL, model folder) for the frontend's missing-models
dialog.
"""

from sf_core.toy.world import GRAMMAR
from sf_core.train.cli import WAN_NEGATIVE_PROMPT

DIT_PT = "self_forcing_dmd.pt"  # the official checkpoint, read by Load Self-Forcing Model
TEACHER = "wan2.1_t2v_1.3B_fp16.safetensors"
TE = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "wan_2.1_vae.safetensors"
_REPACKAGED = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
# file -> (published URL, ComfyUI model folder)
DOWNLOADS = {
    DIT_PT: ("https://huggingface.co/gdhe17/Self-Forcing/resolve/main/checkpoints/self_forcing_dmd.pt", "diffusion_models"),
    TEACHER: (f"{_REPACKAGED}/diffusion_models/{TEACHER}", "diffusion_models"),
    TE: (f"{_REPACKAGED}/text_encoders/{TE}", "text_encoders"),
    VAE: (f"{_REPACKAGED}/vae/{VAE}", "vae"),
}
# the widget of each loader that names a model file
MODEL_WIDGETS = {"SelfForcingLoadModel": "model_name", "UNETLoader": "unet_name", "CLIPLoader": "clip_name",
                 "VAELoader": "vae_name"}
PROMPT = ("A red fox trots through fresh powder snow in a sunlit pine forest, its breath visible in the cold air, "
          "low golden morning light, shallow depth of field, the camera tracks alongside at the fox's height.")

SAMPLER = {
    "seed": 42, "width": 832, "height": 480, "length": 81, "frames_per_chunk": 3,
    "denoising_steps": "1000,750,500,250", "shift": 5.0, "window": 0, "sink": 0, "sink_positions": "adjacent", "fps": 16.0,
}


def _save(video_ref, prefix):
    return {"class_type": "SaveVideo", "inputs": {"video": video_ref, "filename_prefix": prefix, "format": "auto", "codec": "auto"}}


T2V, LONG, I2V, TRAIN, TOY = ("Self-Forcing text to video", "Self-Forcing long video with a prompt timeline",
                              "Self-Forcing image to video", "Self-Forcing LoRA training",
                              "Self-Forcing toy world (no downloads)")
EMBEDDED = "toy world (embedded)"  # the loader's option for the model shipped inside the pack (nothing to download)
TOY_SAMPLER = {**SAMPLER, "width": 64, "height": 64, "length": 81, "shift": 1.0, "window": 9, "sink": 3}

WORKFLOWS = {
    T2V: {
        "1": {"class_type": "SelfForcingLoadModel", "inputs": {"model_name": DIT_PT, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": TE, "type": "wan", "device": "default"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": PROMPT}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "5": {"class_type": "SelfForcingStreamSampler",
              "inputs": {"model": ["1", 0], "positive": ["3", 0], "vae": ["4", 0], **SAMPLER}},
        "6": _save(["5", 2], "self_forcing/t2v"),
    },
    LONG: {
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
    I2V: {
        "1": {"class_type": "SelfForcingLoadModel", "inputs": {"model_name": DIT_PT, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": TE, "type": "wan", "device": "default"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text":
              "The scene comes alive: gentle wind moves through the trees and the camera slowly pushes in."}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "start_frame.png"}},
        "6": {"class_type": "SelfForcingStreamSampler",
              "inputs": {"model": ["1", 0], "positive": ["3", 0], "vae": ["4", 0], "start_image": ["5", 0], **SAMPLER}},
        "7": _save(["6", 2], "self_forcing/i2v"),
    },
    TRAIN: {
        "1": {"class_type": "SelfForcingLoadModel", "inputs": {"model_name": DIT_PT, "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": TEACHER, "weight_dtype": "default"}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": TE, "type": "wan", "device": "default"}},
        "4": {"class_type": "SelfForcingTrainLoRA", "inputs": {
            "model": ["1", 0], "teacher": ["2", 0], "clip": ["3", 0],
            "prompts": PROMPT + "\nA watercolor painting of a lighthouse on a cliff, waves crashing, soft pastel sky.",
            "negative_prompt": WAN_NEGATIVE_PROMPT, "lora_name": "self_forcing_style", "iterations": 200, "rank": 32,
            "learning_rate": 1e-4, "critic_learning_rate": 2e-5, "critic_ratio": 5, "guidance": 3.0, "switch_share": 0.0,
            "width": 832, "height": 480, "length": 81, "frames_per_chunk": 3, "seed": 0,
            "gradient_checkpointing": True, "resume": True, "save_every": 50, "vae": ["7", 0], "preview_every": 25}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": PROMPT}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "8": {"class_type": "SelfForcingStreamSampler",
              "inputs": {"model": ["4", 0], "positive": ["6", 0], "vae": ["7", 0], **SAMPLER}},
        "9": _save(["8", 2], "self_forcing/trained"),
    },
    TOY: {
        "1": {"class_type": "SelfForcingLoadModel", "inputs": {"model_name": EMBEDDED, "weight_dtype": "default"}},
        "2": {"class_type": "SelfForcingLoadToyTextEncoder", "inputs": {}},
        "3": {"class_type": "SelfForcingPromptTimeline", "inputs": {"clip": ["2", 0], "switch": "cut", "timeline": (
            "0s: a red circle moves right and a blue square bounces on a grey background\n"
            "3s: a white circle orbits on a black background")}},
        "4": {"class_type": "SelfForcingStreamSampler",
              "inputs": {"model": ["1", 0], "timeline": ["3", 0], "clip": ["2", 0], **TOY_SAMPLER}},
        "5": _save(["4", 2], "self_forcing/toy"),
    },
}

_MODELS_NOTE = ("Models (the missing-models dialog offers the links when a file is absent):\n"
                "- models/diffusion_models/self_forcing_dmd.pt: huggingface.co/gdhe17/Self-Forcing (checkpoints/)\n"
                "- models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors and models/vae/wan_2.1_vae.safetensors: "
                "huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged")
NOTES = {
    T2V: ("Text to video with Self Forcing: the video streams out chunk by chunk (3 latent frames = 12 frames each), "
          "every chunk denoised in 4 steps, and you watch it on the sampler while later chunks are generated.\n\n"
          "Change: the prompt (CLIP Text Encode); length (1 + 4k frames, 81 = 5 s at 16 fps); width/height "
          "(multiples of 16, trained at 832x480); seed. For long videos set window 12 and sink 3.\n\n" + _MODELS_NOTE),
    LONG: ("A 24 s video whose prompt changes over time: each timeline line starts at a time ('6s: ...') or a chunk "
           "('#8: ...'); at a switch the cached frames are re-encoded under the new prompt (switch: recache) or the "
           "scene cuts (cut). A rolling cache (window 12, sink 3) keeps memory and time per chunk flat however long "
           "the video; return_all off keeps only the last chunk in memory while the VIDEO has it all.\n\n"
           "Change: the timeline text (the first line must start at 0s, one prompt per chunk, none after the end); "
           "length; window/sink.\n\n" + _MODELS_NOTE),
    I2V: ("Image to video: the start image is encoded by the VAE and enters the cache as the first frame; the "
          "stream continues from it.\n\nChange: the image (Load Image), the prompt describing the motion, length, "
          "width/height (the image is resized and centre-cropped to them).\n\n" + _MODELS_NOTE),
    TRAIN: ("Self Forcing LoRA training (DMD): the generator rolls out whole videos with its KV cache; the frozen "
            "Wan2.1 1.3B teacher and a critic supervise them. The LoRA is saved to models/loras/<lora_name>"
            ".safetensors (resumable checkpoints in output/self_forcing_training), then the sampler renders a "
            "video with it. Needs a large GPU (both models resident).\n\nChange: prompts (one per line), "
            "lora_name, iterations, rank, learning rates.\n\n" + _MODELS_NOTE +
            "\n- models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors (teacher): same repackaged repository"),
    TOY: ("The toy world, with nothing to download: a small Self Forcing model shipped inside the pack, trained on "
          "videos of coloured shapes (sf_core/toy/models/MODEL_CARD.md). It runs on a CPU in seconds and streams "
          "the same way as the real model: chunks of 3 latent frames, 4 steps each, a rolling cache (window 9, "
          "sink 3); the sampler decodes with the toy autoencoder the model carries, so no VAE is connected. "
          "At 3 s the timeline cuts to a new scene (after a re-cache the toy model mostly brings the new colour "
          "in elsewhere instead of recolouring in place, so switches cut). While it streams, type a caption into the sampler's live prompt box: it "
          "takes over at the next chunk.\n\n"
          f"Change: the timeline's captions, in the world's grammar: {GRAMMAR}; length; seed.\n\nFor real videos use the other templates with the Self Forcing "
          "weights."),
}


def model_entries(prompt: dict) -> dict[str, list[dict]]:
    """{node id: [properties.models entry]} for the loaders of an API prompt that name a published file."""
    out = {}
    for node_id, node in prompt.items():
        name = node["inputs"].get(MODEL_WIDGETS.get(node["class_type"], ""))
        if name in DOWNLOADS:
            url, folder = DOWNLOADS[name]
            out[node_id] = [{"name": name, "url": url, "directory": folder}]
    return out


def fast(prompt: dict) -> dict:
    """Shrink sizes and counts so a CPU runs a shipped graph in seconds (structure unchanged). The toy graph is
    fast as it is (and its captions must stay in the toy world's grammar)."""
    if any(n["class_type"] == "SelfForcingLoadToyTextEncoder" for n in prompt.values()):
        return prompt
    for node in prompt.values():
        ins = node["inputs"]
        if node["class_type"] == "SelfForcingStreamSampler":
            ins.update(width=64, height=48, length=97 if ins.get("window") else 25)
        if node["class_type"] == "SelfForcingPromptTimeline":
            ins["timeline"] = "0s: a fox in the snow\n2s: the fox looks at the camera\n4s: the fox jumps"
        if node["class_type"] == "SelfForcingTrainLoRA":
            ins.update(iterations=2, rank=4, width=32, height=32, length=9, critic_ratio=1,
                       gradient_checkpointing=False, save_every=1, resume=False, preview_every=1)
    return prompt
