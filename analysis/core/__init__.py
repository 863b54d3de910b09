"""The documented core shared by ``analysis``, ``landscape`` and ``figures``.

Modules, each holding one piece of the protocol:

* ``protocol``: the loss/data protocol: ``LossFn``, ``supervised`` (which makes a
  ``Supervised`` loss), ``split_loss``, ``loss_reduction``, ``default_batch_size``,
  ``check_data``, ``check_loss``, ``data_mean`` (the one sample-weighted reduction)
  and ``scalar_zeros``.
* ``loss``: ``mean_loss``, the sample-weighted mean loss over data.
* ``loss_ce``: the cross-entropy of a large vocabulary in bounded memory, chunk by chunk over
  the tokens (``softmax_hessian_product``, ``ChunkedCrossEntropy``, ``CHUNK_BYTES``), for the
  curvature products.
* ``loss_module``: ``LossModule``, ``loss_fn(model, batch)`` as a module for
  ``torch.func.functional_call`` (the model's tensors swapped for the whole loss).
* ``guards``: ``guarded``, the decorator of every public data routine (deterministic data,
  arguments that agree between ranks), ``is_guarded`` and ``repeated_passes``.
* ``params``: ``select_params``, the ``params=`` argument of every routine.
* ``flat``: ``flatten`` / ``unflatten`` of parameter-shaped tensor lists.
* ``restore``: ``preserved`` (snapshot and exact restore of a model).
* ``seeding``: ``make_generator`` and seeded draws (``randn``, ``rademacher``, ``uniform``).
* ``distributed``: ``all_reduce_sum_`` (the one all-reduce of results), ``all_reduce_max_``,
  ``check_same_on_ranks``, ``fingerprint``, ``broadcast_object``, ``rank``, ``world_size``,
  ``is_distributed``; ``set_collective_timeout`` / ``collective_timeout`` (a bound on every
  wait of a library collective), ``failures_shared`` and ``RankError`` (one rank's failure
  raised on every rank).
* ``files``: the one atomic writer of every file (``atomic_write``: a unique temporary in the
  target's folder, fsync, ``os.replace``), ``write_bytes`` / ``write_text`` / ``write_json`` /
  ``write_npz`` / ``write_figure``, ``save_figure`` (the convention of every figure file),
  ``read_regular`` (never through a symbolic link),
  ``file_sha256``, and ``temporaries`` / ``remove_temporaries`` (what a killed writer left).
* ``results``: the result convention: ``make_metadata``, ``versions``, ``save_result`` /
  ``load_result`` (npz + JSON, never pickle), ``register_result``, ``records_metadata``.
* ``sharding``: ``is_dtensor`` / ``is_sharded`` / ``refuse_sharded`` for FSDP2 ``fully_shard``
  models; ``shard_like`` / ``as_sharded`` / ``local_like`` / ``full_values`` between full
  tensors, local pieces and DTensors placed like a parameter.
* ``compiled``: ``unwrap_compiled`` / ``refuse_compiled`` for ``torch.compile``'d modules.
* ``precision``: ``working_dtype`` (float32 for bfloat16/float16) and ``product_eps``.
* ``lbfgsb`` (imported as a module): ``lbfgsb``, scipy's L-BFGS-B ported to torch on the rows of
  a ``space.Space`` (one process or this rank's shards).
* ``validation``: ``check_*(name, value, ...) -> value`` argument checks (``check_model_mode``
  included), ``ArgumentTypeError`` and ``renamed_keywords``.
"""
from .compiled import refuse_compiled, unwrap_compiled
from .distributed import (all_reduce_max_, all_reduce_sum_, broadcast_object, check_same_on_ranks,
                          collective_timeout, failures_shared, fingerprint, is_distributed,
                          rank, RankError, set_collective_timeout, world_size)
from .guards import guarded, is_guarded, repeated_passes
from .files import (atomic_write, file_sha256, read_regular, remove_temporaries, save_figure,
                    temporaries, write_bytes, write_figure, write_json, write_npz, write_text)
from .flat import flatten, numel, unflatten
from .loss_module import LossModule, own_call
from .params import ParamSelection, select_params
from .precision import LOW_PRECISION, accumulable, product_eps, working_dtype
from .protocol import (BatchSizeFn, DataMean, LIKELIHOODS, LikelihoodError, LossFn, REDUCTIONS,
                       check_data, check_loss, check_loss_fn, data_mean, default_batch_size,
                       likelihood_error, loss_reduction, scalar_zeros, split_loss, Supervised,
                       supervised, to_device)
from .loss import mean_loss
from .restore import preserved
from .sharding import (as_sharded, full_values, is_dtensor, is_sharded, local_like,
                       refuse_sharded, shard_like)
from .results import (ResultMixin, load_result, make_metadata, records_metadata, register_result,
                      save_result, versions)
from .seeding import make_generator, rademacher, randn, uniform
from .validation import (MODEL_MODES, ArgumentTypeError, all_finite, check_bool, check_choice,
                         check_device, check_dtype, check_int, check_model_mode,
                         check_nonnegative, check_number, check_positive, check_probability,
                         renamed_keywords)

__all__ = [
    # sharding (FSDP2 fully_shard models)
    "is_dtensor", "is_sharded", "refuse_sharded", "shard_like", "as_sharded", "full_values",
    "local_like",
    # protocol
    "LossFn", "BatchSizeFn", "DataMean", "REDUCTIONS", "Supervised", "supervised",
    "split_loss", "LIKELIHOODS", "LikelihoodError", "likelihood_error", "loss_reduction",
    "default_batch_size", "check_data", "check_loss",
    "check_loss_fn", "data_mean", "scalar_zeros", "mean_loss", "to_device",
    # loss_module
    "LossModule",
    "own_call",
    # guards
    "guarded", "is_guarded", "repeated_passes",
    # params
    "ParamSelection", "select_params",
    # flat
    "flatten", "unflatten", "numel",
    # restore
    "MODEL_MODES", "preserved", "check_model_mode",
    # seeding
    "make_generator", "randn", "rademacher", "uniform",
    # distributed
    "all_reduce_sum_", "all_reduce_max_", "check_same_on_ranks", "fingerprint",
    "broadcast_object", "is_distributed", "rank", "world_size", "RankError",
    "set_collective_timeout", "collective_timeout", "failures_shared",
    # files
    "atomic_write", "write_bytes", "write_text", "write_json", "write_npz", "write_figure",
    "save_figure",
    "read_regular", "file_sha256", "temporaries", "remove_temporaries",
    # results
    "make_metadata", "versions", "save_result", "load_result", "register_result", "ResultMixin",
    "records_metadata",
    # compiled modules
    "unwrap_compiled", "refuse_compiled",
    # precision
    "LOW_PRECISION", "working_dtype", "accumulable", "product_eps",
    # validation
    "ArgumentTypeError", "check_bool", "check_choice", "check_int", "check_nonnegative",
    "check_number", "check_positive", "check_probability", "check_dtype", "check_device",
    "all_finite", "renamed_keywords",
]
