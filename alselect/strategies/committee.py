"""Query by committee over ensemble members: ``mc_probs [N, T, C]`` with T = members.

Each member's probability row is a committee vote; members count equally. Seung, Opper & Sompolinsky
(1992) for query by committee; vote entropy from Dagan & Engelson (1995); KL-to-the-mean from
McCallum & Nigam (1998). ``bald`` serves ensembles too, and ``mc-entropy``, ``bald`` and these
accept MC-dropout passes as well: the arithmetic is the same.
"""

from __future__ import annotations

from alselect.strategies.base import register
from alselect.strategies.bayesian import MCStrategy, bald, mc_entropy, vote_entropy


@register
class VoteEntropy(MCStrategy):
    name = "vote-entropy"
    summary = "committee: entropy of the members' hard votes (argmax labels)"
    score_meaning = "-sum_c (V_c/T) log(V_c/T) in nats, V_c = members voting c; in [0, log min(C, T)]"
    compute = staticmethod(vote_entropy)


@register
class ConsensusEntropy(MCStrategy):
    name = "consensus-entropy"
    summary = "committee: entropy of the members' averaged probabilities (same as mc-entropy)"
    score_meaning = "H[mean_t p_t] in nats, in [0, log C]"
    compute = staticmethod(mc_entropy)


@register
class KLDisagreement(MCStrategy):
    name = "kl-disagreement"
    summary = "committee: mean KL divergence of each member from the consensus (equals BALD)"
    score_meaning = "mean_t KL(p_t || mean_t p_t) in nats, in [0, log C]; equal to bald's score"
    compute = staticmethod(bald)
