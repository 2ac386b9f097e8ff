# rethink-tl: `make demo` runs the main job on embedded data; `make test` runs the tests.
# Both create .venv from nothing on first use.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
RTL      := $(BIN)/rtl
STAMP    := $(VENV)/.installed

# The demo: real ImageNet weights (EfficientNet-Lite0 from the pip package), TL vs RI, the full
# network and two truncations, 10% of the synthetic training split, 64 px, 20 epochs.
DEMO_DIR  ?= demo_runs
DEMO_ARGS ?= data=synthetic data.image_size=64 data.num_samples=6000 data.fraction=0.1 \
             train.epochs=20 train.lr=3e-4 train.batch_size=32 runtime.progress=false \
             hydra.sweep.dir=$(DEMO_DIR)

.PHONY: help install demo test test-fast clean claims advise

# rtl advise on the demo's data: EfficientNet-Lite0 cut after stages 1-4 and whole, TL and RI, 3 seeds, 27 epochs.
ADVISE_DIR  ?= advise_runs
ADVISE_ARGS ?= data=synthetic data.image_size=64 data.num_samples=6000 data.fraction=0.1 train.epochs=27 \
               train.lr=3e-4 train.batch_size=32 runtime.progress=false hydra.sweep.dir=$(ADVISE_DIR)

help:
	@echo "make demo    TL vs RI on the embedded synthetic data with real EfficientNet-Lite0 weights (CPU, < 10 min)"
	@echo "make test    install into $(VENV) and run the test suite (2 processes, pytest-xdist)"
	@echo "make test-fast   the tests not marked slow (no learning, subprocess, DDP or service tests)"
	@echo "make clean   remove run outputs (keeps $(VENV))"
	@echo "make fig2    toy ROC/PR curves of classifiers A and B (paper Fig. 2), no training"
	@echo "make fig3 ... fig7 [COVID_CSV=... CHEXPERT_ROOT=... CBR_WEIGHTS=...]   sweep + report of one paper figure"
	@echo "make figures PROFILE=smoke   every figure end to end on synthetic data, offline (2-core CPU: about 12 min)"
	@echo "make advise  rtl advise on the embedded data: Lite0 cuts 1-4 and whole x TL/RI x 3 seeds, 27 epochs (CPU)"
	@echo "make claims  claims 2 and 3 in miniature: EfficientNet-Lite0 RI vs TL, whole vs truncated, 3 seeds (CPU)"
	@echo "make pretrain-cbr IMAGENET=DIR   ImageNet pretraining of the four CBR nets, installed for init=pretrained"
	@echo "make xrv COVID_CSV=... [XRV_WEIGHTS=FILE]   RI vs ImageNet TL vs chest X-ray TL (torchxrayvision), Dens-T1..F"

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,weights]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(RTL) train -m model=timm init=random,pretrained $(DEMO_ARGS)
	$(RTL) train -m model=trunc model.cut=2,3 init=random,pretrained $(DEMO_ARGS)
	$(RTL) report $(DEMO_DIR)

# One intra-op thread per process: 2 workers (and the rtl commands they start) on 2 cores, each with a thread per
# core, would slow each other down; the tests that measure threads set their own.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# Everything but the tests marked slow (learning, subprocess, DDP, services): the edit-test loop.
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

advise: $(STAMP)
	$(RTL) advise advise.backbone=tf_efficientnet_lite0 'advise.cuts=[1,2,3,4,whole]' $(ADVISE_ARGS)

clean:
	rm -rf runs multirun outputs demo_runs advise_runs advise bench_runs claims pretrain_runs pretrain_multirun

# The paper's claims 2 (TL beats RI with little data) and 3 (a truncated network matches or beats the
# whole one) in miniature, offline: real ImageNet weights (EfficientNet-Lite0), 5 % of the synthetic
# training split, 3 seeds; table in $(CLAIMS_DIR)/summary.md, figure $(CLAIMS_DIR)/claims.png.
CLAIMS_DIR ?= claims
claims: $(STAMP)
	$(RTL) train -m +experiment=claims hydra.sweep.dir=$(CLAIMS_DIR)/runs $(SWEEP_ARGS)
	$(RTL) report $(CLAIMS_DIR)/runs --figure claims --out $(CLAIMS_DIR)

# ---- Paper figures ---------------------------------------------------------------------------------
# One target per figure: its sweeps (Hydra multiruns; finished runs are skipped, interrupted ones
# resume), then `rtl report`. Every figure's runs go to one tree, $(RUNS)/<data>/<model>/<init>/
# f<fraction>/s<seed>, so figures that need the same setting (fig3 and fig7: CBR TL at 5/10/100 %)
# train it once; `rtl report --figure figN` keeps only the runs of figN's design
# (conf/experiment/figN.yaml) and writes $(FIG_DIR)/figN/{summary.csv,summary.md,figN.png,figN.pdf}.
#
#   make fig3 COVID_CSV=/data/covid/images.csv CBR_WEIGHTS=/data/cbr
#   make fig4 CHEXPERT_ROOT=/data/CheXpert-v1.0-small
#   make figures PROFILE=smoke      every figure end to end, offline, on a CPU (synthetic data)
#   make figures ... LAUNCHER='hydra/launcher=slurm hydra.launcher.partition=gpu'   one SLURM job per run
# Do not run figure targets in parallel (make -j): they share runs.
PROFILE    ?= full
FIG_DIR    ?= figures/$(PROFILE)
RUNS       ?= $(FIG_DIR)/runs
LAUNCHER   ?=
SWEEP_ARGS ?=
# Data (PROFILE=full). The COVID-like set is any image CSV (data=csv) with the paper's prospective
# split: train and val from the images dated before COVID_CUTOFF, test on those dated on or after it, so
# the CSV needs a date column (data.date_column, default "date"; `rtl data` checks it before any run).
# COVID_CUTOFF=none splits at random by patient instead, and the figures' subtitles say so.
COVID_CSV     ?=
COVID_NAME    ?= covid
COVID_CUTOFF  ?= 2020-06-30
CHEXPERT_ROOT ?=
# CBR nets have no public ImageNet weights: `make pretrain-cbr IMAGENET=DIR` makes and installs them, and
# the figure targets then find them. CBR_WEIGHTS=DIR, a folder of <model>.pth (cbr_large_t.pth,
# cbr_large_w.pth, cbr_small.pth, cbr_tiny.pth), overrides that. A CBR net with neither has its TL runs
# skipped (with a note), and the figures show its RI bars only.
CBR_WEIGHTS   ?=
# Models per sweep: CBR nets apart from deep nets, because their TL runs read other weights.
CBR_MODELS ?= cbr_large_t,cbr_large_w,cbr_small,cbr_tiny
FIG3_DEEP  ?= dens_f,res_f
FIG4_DEEP  ?= $(FIG3_DEEP)
FIG5_DEEP  ?= dens_t1,dens_t2,dens_t3,dens_f
FIG5_CBR   ?= cbr_small
FIG6_DEEP  ?= dens_t1,dens_t2,dens_t3,dens_s1,dens_s2,dens_s3,dens_f
FIG7_DEEP  ?= dens_t1,dens_t2,dens_t3,dens_f
# `make xrv`: ImageNet or chest X-ray pretraining, and how deep (conf/experiment/xrv.yaml). XRV_WEIGHTS=FILE: a
# torchxrayvision DenseNet121 file; without it init=xrv finds torchxrayvision's cache or downloads.
XRV_MODELS ?= dens_t1,dens_t2,dens_t3,dens_f
XRV_WEIGHTS ?=
FIG3_ALL   := $(CBR_MODELS),$(FIG3_DEEP)
FIG4_ALL   := $(CBR_MODELS),$(FIG4_DEEP)

ifeq ($(PROFILE),full)
COVID_DATA    := data=csv data.csv=$(COVID_CSV) data.name=$(COVID_NAME) \
                 $(if $(filter none None NONE,$(COVID_CUTOFF)),,data.cutoff_date=$(COVID_CUTOFF))
CHEXPERT_DATA := data=chexpert data.root=$(CHEXPERT_ROOT)
COVID_RUNS    := $(RUNS)/$(COVID_NAME)
CHEXPERT_RUNS := $(RUNS)/chexpert
PROFILE_ARGS  :=
DEEP_TL       :=
CBR_TL        := $(if $(CBR_WEIGHTS),'init.weights=$(abspath $(CBR_WEIGHTS))/$${model.name}.pth')
XRV_TL        := $(if $(XRV_WEIGHTS),'init.weights=$(abspath $(XRV_WEIGHTS))')
NOTE          ?=
NEEDS         :=
XRV_NEEDS     :=
else ifeq ($(PROFILE),smoke)
# Smoke profile: the same models x inits x fractions on the embedded synthetic data, 1 seed, few
# epochs, 32 px for deep nets and each CBR net at the smallest size it accepts; offline. ImageNet
# weights cannot be installed offline, so "pretrained" reads seeded random stand-in files
# (scripts/standin_weights.py): the figures check the pipeline, not the paper's claims, and say so.
SMOKE_SAMPLES ?= 300
SMOKE_EPOCHS  ?= 2
SMOKE_SIZE    ?= 32
# One thread per run: two OpenMP threads on a 2-core machine that is also doing something else
# wait on each other at every barrier and ran 10x slower in our measurements than one thread.
SMOKE_THREADS ?= 1
SMOKE_SIZES   ?= {cbr_large_t:217,cbr_large_w:121,cbr_small:121,cbr_tiny:91}
STANDIN       := $(FIG_DIR)/standin-weights
COVID_DATA    := data=synthetic data.num_samples=$(SMOKE_SAMPLES) data.prevalence=0.3 data.test_prevalence=0.3 \
                 '+vars.image_size_by_model=$(SMOKE_SIZES)' \
                 'data.image_size="$${oc.select:vars.image_size_by_model.$${model.name},$(SMOKE_SIZE)}"'
CHEXPERT_DATA := $(COVID_DATA)
COVID_RUNS    := $(RUNS)/synthetic
CHEXPERT_RUNS := $(RUNS)/synthetic
PROFILE_ARGS  := train.epochs=$(SMOKE_EPOCHS) train.batch_size=16 train.lr=1e-3 train.seed=0 runtime.device=cpu \
                 runtime.threads=$(SMOKE_THREADS) \
                 runtime.progress=false
DEEP_TL       := 'init.weights=$(abspath $(STANDIN))/$${model.name}.pth'
CBR_TL        := $(DEEP_TL)
XRV_TL        := 'init.weights=$(abspath $(STANDIN))/xrv-densenet121.pth'
XRV_NEEDS     := $(STANDIN)/xrv-densenet121.pth
NOTE          ?= smoke profile: synthetic data stands in for COVID-19 and CheXpert ($(SMOKE_SAMPLES) images, \
                 epochs: $(SMOKE_EPOCHS)); "TL" starts from seeded random stand-in weights, not ImageNet: \
                 this checks the pipeline, its numbers say nothing about transfer learning.
NEEDS         := $(STANDIN)/README.txt
else
$(error PROFILE must be full or smoke, not '$(PROFILE)')
endif

# $(call sweep,EXPERIMENT,DATA ARGS,MODELS,INIT[,EXTRA ARGS])
sweep = $(RTL) train -m +experiment=$(1) $(2) model=$(3) init=$(4) $(5) $(PROFILE_ARGS) \
        hydra.sweep.dir=$(RUNS) $(LAUNCHER) $(SWEEP_ARGS)
# $(call cbr_tl,EXPERIMENT,DATA ARGS[,MODELS]): the CBR TL sweep. With CBR_WEIGHTS, from that folder; else
# from the weights rtl pretrain installed (make pretrain-cbr), for the models that have them: `rtl weights
# check` prints those and names the others, whose TL runs are skipped.
cbr_tl = $(if $(CBR_TL),$(call sweep,$(1),$(2),$(or $(3),$(CBR_MODELS)),pretrained,$(CBR_TL)),\
         @have=$$($(RTL) weights check $(or $(3),$(CBR_MODELS))) || exit 2; \
         if [ -n "$$have" ]; then $(call sweep,$(1),$(2),$$have,pretrained); fi)
# $(call report,EXPERIMENT,RUN DIR)
report = $(RTL) report $(2) --figure $(1) --out $(FIG_DIR)/$(1) $(if $(NOTE),--note '$(NOTE)')
# $(call need,VARIABLE): stop with a message when PROFILE=full lacks a data path
need = $(if $(filter full,$(PROFILE)),@test -n "$($(1))" || { echo "make $@: set $(1)=PATH to the real data; or use PROFILE=smoke (synthetic data)" >&2; exit 2; })
# $(call check_data,DATA ARGS,HINT): read the tables and compute the split of every data fraction and seed of
# the figure's sweep (its experiment and SWEEP_ARGS), no image decoded, before any run: a CSV without its date
# column (or any other data problem) stops here, not in every run of the sweep
check_data = $(if $(filter full,$(PROFILE)),@$(RTL) data +experiment=$@ $(1) $(SWEEP_ARGS) || { echo "make $@: fix the data settings above $(strip $(2))" >&2; exit 2; })
# $(call need_cutoff): an empty COVID_CUTOFF would silently mean a random split
need_cutoff = $(if $(filter full,$(PROFILE)),@test -n "$(strip $(COVID_CUTOFF))" || { echo "make $@: COVID_CUTOFF is empty: give the prospective split's date (YYYY-MM-DD; the paper's is 2020-06-30, the default) or none for a random split by patient" >&2; exit 2; })
COVID_HINT := $(if $(filter none None NONE,$(COVID_CUTOFF)),(COVID_CUTOFF=none: random split by patient),\
              (COVID_CUTOFF=$(COVID_CUTOFF): the prospective split needs a date per image; for a CSV without dates, \
              COVID_CUTOFF=none splits at random by patient instead))

# ---- Pretraining the CBR nets (the paper's TL arm for them) ---------------------------------------------
# One `rtl pretrain` per CBR net on an ImageFolder copy of ImageNet (train/<class>/, val/<class>/), each
# installed where init=pretrained finds it. A sweep: LAUNCHER=hydra/launcher=slurm gives one SLURM job each
# (add hydra.launcher.gpus_per_node=8 hydra.launcher.tasks_per_node=8 recipe.batch_size=32 for 8 GPUs per job).
IMAGENET      ?=
PRETRAIN_ARGS ?=
pretrain-cbr: $(STAMP)
	@test -n "$(IMAGENET)" || { echo "make $@: set IMAGENET=DIR, the ImageFolder copy of ImageNet (DIR/train/<class>/, DIR/val/<class>/)" >&2; exit 2; }
	$(RTL) pretrain -m model=$(CBR_MODELS) data.root=$(abspath $(IMAGENET)) $(LAUNCHER) $(PRETRAIN_ARGS)
	$(RTL) weights list

.PHONY: figures fig2 fig3 fig4 fig5 fig6 fig7 xrv clean-smoke pretrain-cbr
.NOTPARALLEL:

figures: fig2 fig3 fig4 fig5 fig6 fig7

$(STANDIN)/README.txt: | $(STAMP)
	$(BIN)/python scripts/standin_weights.py $(STANDIN)

# The smoke profile's chest X-ray stand-in: torchxrayvision's layout (torchvision's DenseNet121 names, a grey conv0),
# seeded random weights, not chest X-ray features.
$(STANDIN)/xrv-densenet121.pth: | $(STAMP)
	@mkdir -p $(@D)
	$(BIN)/python -c "import torch, torchvision; from rethink_tl.models.truncated import grey_stem; \
	torch.manual_seed(20210609); net = torchvision.models.densenet121(weights=None); grey_stem(net.features); \
	torch.save(net.state_dict(), '$@')"

fig2: $(STAMP)
	$(RTL) report $(FIG_DIR)/fig2 --figure fig2

fig3: $(STAMP) $(NEEDS)
	$(call need,COVID_CSV)
	$(call need_cutoff)
	$(call check_data,$(COVID_DATA),$(COVID_HINT))
	$(call sweep,fig3,$(COVID_DATA),$(FIG3_ALL),random)
	$(call sweep,fig3,$(COVID_DATA),$(FIG3_DEEP),pretrained,$(DEEP_TL))
	$(call cbr_tl,fig3,$(COVID_DATA))
	$(call report,fig3,$(COVID_RUNS))

fig4: $(STAMP) $(NEEDS)
	$(call need,CHEXPERT_ROOT)
	$(call check_data,$(CHEXPERT_DATA))
	$(call sweep,fig4,$(CHEXPERT_DATA),$(FIG4_ALL),random)
	$(call sweep,fig4,$(CHEXPERT_DATA),$(FIG4_DEEP),pretrained,$(DEEP_TL))
	$(call cbr_tl,fig4,$(CHEXPERT_DATA))
	$(call report,fig4,$(CHEXPERT_RUNS))

fig5: $(STAMP) $(NEEDS)
	$(call need,CHEXPERT_ROOT)
	$(call check_data,$(CHEXPERT_DATA))
	$(call sweep,fig5,$(CHEXPERT_DATA),$(FIG5_DEEP),pretrained,$(DEEP_TL))
	$(call cbr_tl,fig5,$(CHEXPERT_DATA),$(FIG5_CBR))
	$(call report,fig5,$(CHEXPERT_RUNS))

fig6: $(STAMP) $(NEEDS)
	$(call need,COVID_CSV)
	$(call need_cutoff)
	$(call check_data,$(COVID_DATA),$(COVID_HINT))
	$(call sweep,fig6,$(COVID_DATA),$(FIG6_DEEP),pretrained,$(DEEP_TL))
	$(call report,fig6,$(COVID_RUNS))

fig7: $(STAMP) $(NEEDS)
	$(call need,COVID_CSV)
	$(call need_cutoff)
	$(call check_data,$(COVID_DATA),$(COVID_HINT))
	$(call sweep,fig7,$(COVID_DATA),$(FIG7_DEEP),pretrained,$(DEEP_TL))
	$(call cbr_tl,fig7,$(COVID_DATA))
	$(call report,fig7,$(COVID_RUNS))

# Not a paper figure: the DenseNet ladder with RI, ImageNet TL and chest X-ray TL (init=xrv) on the COVID-like data.
# Not on CheXpert: torchxrayvision's weights were trained on it (and on NIH, PadChest, MIMIC-CXR, OpenI, RSNA).
xrv: $(STAMP) $(NEEDS) $(XRV_NEEDS)
	$(call need,COVID_CSV)
	$(call need_cutoff)
	$(call check_data,$(COVID_DATA),$(COVID_HINT))
	$(call sweep,xrv,$(COVID_DATA),$(XRV_MODELS),random)
	$(call sweep,xrv,$(COVID_DATA),$(XRV_MODELS),pretrained,$(DEEP_TL))
	$(call sweep,xrv,$(COVID_DATA),$(XRV_MODELS),xrv,$(XRV_TL))
	$(call report,xrv,$(COVID_RUNS))

# Smoke outputs only: full-profile runs cost GPU days and are never removed by a target.
clean-smoke:
	rm -rf figures/smoke
