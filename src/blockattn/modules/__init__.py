"""nn.Module attention blocks from vision and video papers, each running on the block engine."""
from blockattn.modules.combiner import CombinerAttention
from blockattn.modules.dpenet import DDRB, DPENet, ERPAB
from blockattn.modules.halo import HaloAttention
from blockattn.modules.lamamba import SS2D, LaMambaBlock, WindowAttention, selective_scan
from blockattn.modules.neighborhood import NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d
from blockattn.modules.next_frame import FrameKVCache, NextFrameTransformer
from blockattn.modules.ninformer import NiNBlock
from blockattn.modules.oat import (ObjectAttentionTransformer, ObjectCrossAttention, ObjectPositionalEncoding,
                                  fit_positional_table, positional_table_error)
from blockattn.modules.overlock import ContMix, ContMixBlock, DynamicConvBlock, contmix_aggregate
from blockattn.modules.patnet import PATBlock, PATChannel, PATSelf, PATSpatial
from blockattn.modules.pointer import PointerAttention, PointerNetwork
from blockattn.modules.psa import PolarizedSelfAttention
from blockattn.modules.sentence_attention import EmbeddingAttention, SentenceAttentionBlock
from blockattn.modules.slice_context import ChannelContext, GlobalSliceContext, SliceEntropyContext
from blockattn.modules.sparsifiner import SparsifinerAttention, SparsifinerPredictor
from blockattn.modules.ssl_uvos import SpatioTemporalBlock, hierarchical_cluster, symmetric_kl
from blockattn.modules.styleswin import StyleSwinDoubleAttention

__all__ = ["CombinerAttention", "HaloAttention", "NeighborhoodAttention1d", "NeighborhoodAttention2d",
           "NeighborhoodAttention3d", "FrameKVCache", "NextFrameTransformer", "StyleSwinDoubleAttention",
           "PolarizedSelfAttention", "PointerAttention", "PointerNetwork",
           "NiNBlock", "PATBlock", "PATChannel", "PATSelf", "PATSpatial",
           "ContMix", "ContMixBlock", "DynamicConvBlock", "contmix_aggregate",
           "EmbeddingAttention", "SentenceAttentionBlock",
           "ObjectAttentionTransformer", "ObjectCrossAttention", "ObjectPositionalEncoding", "fit_positional_table",
           "positional_table_error", "DDRB", "DPENet", "ERPAB",
           "LaMambaBlock", "SS2D", "WindowAttention", "selective_scan",
           "SpatioTemporalBlock", "hierarchical_cluster", "symmetric_kl",
           "SparsifinerAttention", "SparsifinerPredictor",
           "ChannelContext", "GlobalSliceContext", "SliceEntropyContext"]
