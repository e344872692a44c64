"""Tests for fedserver_mimi.messages, the parsers of MLS message framing."""

from __future__ import annotations

import hashlib
import typing

import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedserver_mimi.codec import MLSDecodeError
from fedserver_mimi.encode import (
    EMPTY_VECTOR,
    encode_add_proposal,
    encode_basic_credential,
    encode_capabilities,
    encode_commit_source,
    encode_external_init_proposal,
    encode_external_psk_id,
    encode_group_context_extensions_proposal,
    encode_key_package_source,
    encode_leaf_node,
    encode_proposal_by_reference,
    encode_proposal_by_value,
    encode_psk_proposal,
    encode_reinit_proposal,
    encode_remove_proposal,
    encode_resumption_psk_id,
    encode_update_path,
    encode_update_path_node,
    encode_update_proposal,
    encode_update_source,
    make_group_info,
    make_key_package,
    make_private_message,
    make_public_commit,
    make_public_message,
    make_public_proposal,
    make_welcome,
    mls_message,
    u8,
    u16,
    vec,
)
from fedserver_mimi.keypackage import (
    Capabilities,
    Extension,
    KeyPackageError,
    parse_key_package,
    parse_key_package_message,
    verify_key_package_signature,
    verify_leaf_node_signature,
)
from fedserver_mimi.messages import (
    CONTENT_APPLICATION,
    CONTENT_COMMIT,
    CONTENT_PROPOSAL,
    MAX_MESSAGE_SIZE,
    PROPOSAL_ADD,
    PROPOSAL_EXTERNAL_INIT,
    PROPOSAL_GROUP_CONTEXT_EXTENSIONS,
    PROPOSAL_PSK,
    PROPOSAL_REINIT,
    PROPOSAL_REMOVE,
    PROPOSAL_UPDATE,
    SENDER_EXTERNAL,
    SENDER_MEMBER,
    SENDER_NEW_MEMBER_COMMIT,
    SENDER_NEW_MEMBER_PROPOSAL,
    WIRE_FORMAT_GROUP_INFO,
    WIRE_FORMAT_KEY_PACKAGE,
    WIRE_FORMAT_PRIVATE_MESSAGE,
    WIRE_FORMAT_PUBLIC_MESSAGE,
    WIRE_FORMAT_WELCOME,
    GroupInfoSummary,
    HandshakeSummary,
    MLSMessageError,
    WelcomeSummary,
    key_package_ref,
    parse_group_info,
    parse_handshake,
    parse_welcome,
    verify_group_info_signature,
)
from tests.unit.mls_helpers import MUTATIONS, mutate

# Published test vectors of the MLS working group's interoperability suite,
# mlswg/mls-implementations (which OpenMLS and mlspp run).
#
# MESSAGES_JSON: values of the first two entries of test-vectors/messages.json
# (stored version at commit 4a523efa3e184d807334f80e1905eb4055e64623, the one
# test_mimi_keypackage quotes the KeyPackages of): MLSMessages of cipher suite 1
# in a group of one member, Alice (leaf 0), whose signature key the GroupInfo's
# ratchet_tree extension holds (SIGNER_KEYS).
MESSAGES_JSON = [
    {
        "mls_welcome": (
            "000100030001409820b476143a05c9998ec979b6238fee883a9f465ed4b6ea2c694b2258e51dba7d5f20e1410ed962d691c2df6625"
            "d4ce889f322ae9ebdeff7a20cca524968e78d41c0140544245da924c89675bbc415e713ba2daf036bdab200d1dad416de001089cbf"
            "99918fb57f26658f117df2e8925aeb60a009636d6f64fab5b66debf02aeefbd0a7e1927196f9bfd2796a1706586b7d0bc39d11d47a"
            "0b4102117b239baf2f747e56ac7f8b2868966ef5507fff8dcf31aaca212734fd903b73f3b4eac307ba16d00afe4e8714ddb9af0e31"
            "3287b8786df09ed99447bcedc8b8fdaa5fff19339f7a176801c1224a0e0c1f701dcc7fe9183a632b88b5f91f2c5780be8f9c2a40ed"
            "9157dd57ebb729733cbdece565f6e00bb59406b531775c66d6c52491de29dd1b64e293046d06c68477e0ecd1b22d704d1cdc4615b0"
            "3f98bde98535ac9f0eee6b7c7a0ccb8ac39157aa846be24dcffcb05a5f048b346f0479f83bcf3bfa23c6a3bb3b7652f565d5229559"
            "8ccd4714fead52ca595a6d613b907c322079325cd3af24eda3544457aa76d2930c43c1e40e22d290a57f8f3a9dd6121a7b"
        ),
        "mls_group_info": (
            "00010004000100011057f89bad9b38b906d15100f720422e900000000000000000204791deb51610ceeee4333b92eb02dbaeff2f29"
            "809ba66bfa105233e478f0b70720000000000000000000000000000000000000000000000000000000000000000006000303000000"
            "40d5000240ad40ab010120d64aa6e8d92e72e40f5ee1e4530c5f15e8b1088fdb27191807ea682dce8722232038a5e7481e20afe7e5"
            "00cb3065a67ebe9c2c3ecd537d4479309159fe2215c4b5000105416c69636502000102000100000200010100000000640884240000"
            "0000647750340040409126d4860e4813c5cfddc8943406bcf5a6052ee28f48e41d1feebdd6f833cfc9cffcb3d25cb6306060f86273"
            "abce10b21d73c8b48f1868ca0d7311507899a7000004212046f72a2aadd9061959785bde73e922df0de3bae3c6aefc29a1e2e7b0f4"
            "f4987d203466c4297e35375676e20ccc765b1e46973e9468c1679da707be06be0971be8500000000404022f616969d2bc9bbf0aa71"
            "0e211c4e695be3383a3485c31857dcb7cadc40cb690bf12d9a3eb460134f3b414e8b7a0ebcdd37de2c1c52fb97bb8e376ade02de0b"
        ),
        "public_message_application": (
            "000100011057f89bad9b38b906d15100f720422e90000000000000000101000000000361616401036d7367404069d1761429c48259"
            "525c1a7bdda1e92837a8e5f124f37f008ed1f0d9927cc197a708569fd1daccdbe79b5b9fb2d3eeb0e2da0ae7d3471cc8d85e7063da"
            "fda309206c278f9cb0f2bfc369623ed9bb6ed25eccd17037f9a9d4939a2e8c2960194259"
        ),
        "public_message_proposal": (
            "000100011057f89bad9b38b906d15100f720422e900000000000000000010000000003616164020001000100012014daaedfec3b04"
            "ca1b49695697b85e1e278c2b5851d031afe35ff0611aaec9602024a768c73a100ccceb3e062790bca6f17d95ae5567c0bfbdd9ba52"
            "bbd84e9a18203170de95c16a387572fe5bc68757c56b68537f336ece7262b192c8be238da980000103426f62020001060001000200"
            "030200010c0001000200030004000500070200010100000000640884240000000064775034004040f40844a8d907c710f5da6423d3"
            "0b4a0161924242931cc213bb2aff6f953550887f16f12d72248690e1cc15045d51b5796a1afc5f521e8f2cf9975ed38ffaa3070040"
            "40b0ffdb7f714e1a040e43f0e493f08eac215269b52b321112edb66a4bd2bd2136c8bf55dd9adbf3fc2a27395647bc74760d5b5b36"
            "c8a19050ad4f7c377b0b1d0e404022d70b9eb5620721c5962b1114270fc6d55fc3b082dff3498075bd5c581dd5834d71fd6aa32da7"
            "676b6aee108f0e4128f13da7ac4ac2a1806e04ecbd6befba07206c278f9cb0f2bfc369623ed9bb6ed25eccd17037f9a9d4939a2e8c"
            "2960194259"
        ),
        "public_message_commit": (
            "000100011057f89bad9b38b906d15100f720422e90000000000000000001000000000361616403220220667a257d4ee521993fefc3"
            "7ec3b43c8dd5572503134330219943cfcfc1a5a95201207098e821eef3e503ce5f2a54bfce94cf78b1aac590be0fe685e8dcbc7696"
            "d4452038a5e7481e20afe7e500cb3065a67ebe9c2c3ecd537d4479309159fe2215c4b5000105416c69636502000102000100000200"
            "0103202e6efd75b8b34836db7d525c7eeb65dcc11a918f21b5a9724ba63de99ef3b1820040404833e2b7ce5740d84e06dfb6e9bb8c"
            "2fa3cec86baf43b0ed6459e9e4910d6fcd1dda761fb4e43d2a3c70fcf045f95ee86dc7bad9078501c774c0f3cf275d170f22209ee6"
            "d8a7d342c383b16379beb6b4f7d3ce871973b1a3cee77f190fe11fbc394b0040402d8a2583d18875921992fc08a922ac9eb8fafbb5"
            "d7dc7550011d6885fd083f2bdb4fe08dc3b28489dce11aa0500b176cce5c43970a4a01e1163fb4a5362c390220fd07c4baa82036fe"
            "87fe89a47024628e3a1cf1a7f5c76b4782f9ed5a353cc99b206c278f9cb0f2bfc369623ed9bb6ed25eccd17037f9a9d4939a2e8c29"
            "60194259"
        ),
        "private_message": (
            "000100021057f89bad9b38b906d15100f720422e90000000000000000002036161641c2faa013da0b943a55ef506081fb419a69b32"
            "10d57c9eaaf3279a97fa419f1c5d62527b15ed33031cae6db5146ada19ce847ad0a381c9b13d36a78a34aa0c7bd98c4d4a17e40a47"
            "cda275121a7ef5b0e6d16aad03937f4b0bc0a4f62527108c9995005e67c618e7d46bb82e78c5ac528cd4f89dbba5f2565fac926f49"
            "a94c48e99ac0ff87cbb7de8289e37c5d77acafbe4ba140d6184fecd1a93ea9ac54119b7ed513d7f5c65541d8d9e8bea13278a4ee97"
            "edafe026961063333d69269e636e14873b40f85f39c12ff44db701a651dd873d2361eaccf5ef231eab42270b0af14c9f1adf5b03db"
            "2cb20cac503ca030512df27c4acd828f9be579ee54fdd840b6953d73a149c347f116a0abd0dcb5bcd3e118f52e18cace30f5e3c233"
            "cf16cc4edab69ee98f739b806f48a158e508a17a0d9275d926e9bcc1e88182d8ba14e1997e982b989422389485b47152a4a26313d9"
            "0f7af326f7bb2d4b8f51d0190e1e33411337df1758ce95e499c8908ccc5f888024a62449ffbb7a7052ba4a31328655ddd92630b271"
            "069bbc2d97a4959ca4227f12ec95bad5c732ced7370a594eec366eabd6f5becdafbf1cd72e8883138a917544bce9d93c2c09cc4e59"
            "1ed94c"
        ),
    },
    {
        "mls_welcome": (
            "000100030001409820328d982076aaa8e9d58177e0a7caa02e247d6cf0fc8f32a7a807371b6ef3269c20a02d8a4a27f9be96cf3f2d"
            "b2d7488e377b19beab7c5ac786f111a5ca806e122b4054f81d5e3858f163d0fd4d4443e83d09c5bfbf4f4a72469fb6f60aca232de3"
            "4a6fb41d547557559449948268377ade218df2eb6beaa40bbafa2d5cb04ac9ae53491379efd87b290e04cf03dcf4235b86a3cc8e81"
            "e441021cd52596d382bd1b4ce017f699f3593388649c4638a4f3175f30c5331add2fdb628762260bad05021552752029bc3a2a7a06"
            "9c9fc28f8acb0db0be2bcdf3e8d139902f700f9e2cb31ff894ccecfe12ffb4eba7f329a2aa5ff60b3a7f0db0e9a75c20d0a312ec05"
            "02b63b3570640c39374b0e2713aa9077df80c3aa8bff6f8a9713167cd2e421941382a359924b3b173ca15880238c8a69ac2836db9e"
            "d302e1ddbca1b32e4d26890bd537b1f50446f6ed770415a59a2e71cb79ece5c0e1f6c9c7d21d70094fbb804ee66ddbb2ad6fd9473f"
            "674e3bf36b892448ff10d88a3692e9b3ad878ec500bf470c7d42184f7f4ed60ee0b9638a276946535e988b3643fd7d4520"
        ),
        "mls_group_info": (
            "000100040001000110f981b8f284442237b1e1d1506e51e7be0000000000000000200ef298263d97ac2186953b187c710afa3bb1af"
            "29ad1159f4baeda098d99c11bd20000000000000000000000000000000000000000000000000000000000000000006000303000000"
            "40d5000240ad40ab0101201df6810827e3b46c64691012521b71c5fa2134433b1c718f9919796d1e14ec6520745ea11834d7b08915"
            "c3c84a780ef96618f34399fbbeb904d8a1c3bca00a9203000105416c69636502000102000100000200010100000000640884240000"
            "000064775034004040f7d4667c6b29a2bfff476e28afee110a9f2f5b22f75925aad74ff6b35d39a370c3555153028b8633f552a412"
            "ea54516bc279f88edc58549d29899399f70ffc0d00042120e3fffcd267dad9b67bc0b55311bc62d66f609a4a4728f21a8ebf29ecc8"
            "3bb27c205d43db35fdc1ea53c49a146bbada4fdbb67d05a59f1fb920cd8c3a5d73f43b61000000004040f5f1d1264bdf7d9741543d"
            "16d15ae8fac701edf86714d22948fd9c328d75ff3bfdfbf45c2ff83b18f1fb1217866a0ec3a6b2db49ffd9be4904604f08ec9b480f"
        ),
        "public_message_application": (
            "0001000110f981b8f284442237b1e1d1506e51e7be000000000000000101000000000361616401036d73674040018e8c23cf4ea8e8"
            "b8dc5ce24e6a5312e63263e8bc2fe02b40fa66482e10a74e3c6a7767ef9eca7c2ae92fc543a5c7b34aa87a28d90c62df4de374a4ab"
            "5c290e2090b35137b43918c930311eaac258f97de55d75e514d16142e898af34e12ada40"
        ),
        "public_message_proposal": (
            "0001000110f981b8f284442237b1e1d1506e51e7be0000000000000000010000000003616164020001000100012012d1042a25a1b6"
            "b0a6206521d3aca438265ce32c8bfd25e3aee9ecf4e2760262208d0fbf79711473f870bf9e7c526241e3de6a41b8e654af9d86bba7"
            "32b1c226322076a4868858bffb529ebaed857aa9f45015a214780baf0a0124f129a652263232000103426f62020001060001000200"
            "030200010c00010002000300040005000702000101000000006408842400000000647750340040404741f586fda3f77af3c42e2788"
            "db637f78879e9f38f99486f38f866328bc50ff86b7a3061e0f80c48929b47f719dfe03137864fe988d25b12be2c05fb8ec4c0a0040"
            "40de0bc08387ecfcdc8343990c9a54be08f7f3bd2d3fedacdeecf97b533b7875a23f0976407b6798951209cecfaed8350cfcaac8c7"
            "31d893ef1be7e52006a428034040cb8ee739734e7c49dce7258eb5ccf46f6792d3754d9f9c117427c1fc1f38c04b1dee9b9ad32139"
            "ae5d69c2fdff03c9bc495e6b87d8380388251527edb72249062090b35137b43918c930311eaac258f97de55d75e514d16142e898af"
            "34e12ada40"
        ),
        "public_message_commit": (
            "0001000110f981b8f284442237b1e1d1506e51e7be000000000000000001000000000361616403220220d208bfafcb6cfd2c9fba0b"
            "9e9891b3264408e1f8507aa8f8c9aee93008f584d7012069d212a853c045bb5ce09a0093dfc1885e20d380c4aabeeb29a1d4c15ff2"
            "a33120745ea11834d7b08915c3c84a780ef96618f34399fbbeb904d8a1c3bca00a9203000105416c69636502000102000100000200"
            "010320d589ea76d1d96438d91e346f64e4d8c19b54c4853da1c1314a67fc5c70c3654e0040400abf12bb3ba64c4eab600d6c0420ee"
            "72367da92871696fcd983e185073246b6f5dff9356b40415053553ff0e0a704150855f54adb798d6845bd2eed4a8b6ba012220322f"
            "255e4409ad3345dfc9e688f8f8767e51f808bbc6b70808f922f21832d5300040400ac5bd6182a989b1fad8230eb7af5b8d9d371c9a"
            "4f5c7f441039f95d3e15486811cef1a51b764dad8ceff5e274c97b95aa4d3146cc4eaf693534be6da3f0da03203891ac391c55caeb"
            "ce671d9c1a81d06075b65678d1222e8a757722f98b1c85612090b35137b43918c930311eaac258f97de55d75e514d16142e898af34"
            "e12ada40"
        ),
        "private_message": (
            "0001000210f981b8f284442237b1e1d1506e51e7be000000000000000003036161641cda3b2706984e09617833d8c6627500db125b"
            "5ac1fb0f3262c3b5085c417790099778fb5b246e82c2ffb42d4cc67d006c1adcee6550d98cffab5bf66e9003be9163ca46ecc2b4a2"
            "15d1245617fb11a28fd9069a0e37402972f850c77b4353701b05ecbfca941d89246a50ddebfc65922d90c6f43de6ac8507f5e3b08e"
            "463d5f21798f723c4da3d02e9e645d6ce18c29936ccfe93b3bd8699c79e186ebbc039481955544c6c2a60c123809ce529809cb46be"
            "715432337040fb5ff6aea8c8d0b111812735f4bf221828a3aeba5544d88657cb9b8712f40b0a8ef0489518b58f5ae0a5dc9690635b"
            "8f2cc80450937f0fb61b8edf55b07269e9e923c081f48db5ca6bbbacd209db2b09d8c6312362673dd7f716030d57323f5dc0bb857e"
            "80564d437ca54f2015ae558da357f376ac3ba0f99e3297f208e7349342e4d41a877c54db615403160a1dbc43ad70bdf52d64aef348"
            "d43e2fe210323f967f68b3c88e4d205832b6c33d03f0f6baf9276f3cd5558ec9d40565ebedd66b353b236489eb25ff326ca71fdeb7"
            "f0c2f6f3d2c99d438ae2e47de10e763e"
        ),
    },
]


SIGNER_KEYS = [
    "38a5e7481e20afe7e500cb3065a67ebe9c2c3ecd537d4479309159fe2215c4b5",
    "745ea11834d7b08915c3c84a780ef96618f34399fbbeb904d8a1c3bca00a9203",
]
GROUP_IDS = ["57f89bad9b38b906d15100f720422e90", "f981b8f284442237b1e1d1506e51e7be"]

# WELCOME_JSON_*: from test-vectors/welcome.json (stored version at commit
# f026e6fae859a9c32f58f6b0d1794773513b9684): bare KeyPackages of cipher suites
# 1 (SHA-256), 4 (SHA-512) and 7 (SHA-384), and the KeyPackageRef each entry's
# Welcome names its new member by (the first secret's new_member field).  That
# file's Welcomes predate RFC 9420's MLSMessage framing: a Welcome there starts
# with a 2-byte version (0x0001) where an MLSMessage now has version and
# wire_format; the rest is the RFC 9420 Welcome.
WELCOME_JSON_KEY_PACKAGE_1 = (
    "000100012028b2cd6417984dc4708c61a1cce7c0f11d181bd36d6f7a610ea21cb96f79ba6020275d9e6337b11a5e21ba755f2353053a500103"
    "efa1c5ac7c07d3a78f8817ad2d203de79c7e370156ce25a88d897a8ea7c8f90fea1f71fbeb5f31855312d8750007000120b640fbb0df8e646b"
    "29c83c5ed08aea89f72ab108922827ea76cd3b917d6d99420200010c00010002000300040005000600000400010002010000000000000000ff"
    "ffffffffffffff004040fd81837a40a9ba774bb44db665081f4d0ff2a8f680ce5c902b17acc4ae6d9a14b9d4e9b4f8e7d74af8ff42032ec9ca"
    "adf267e85931b550eebbe480150d4b9b0a0040401ec696ab731d5a7b1092b0db9912fe35086e188ce2946996bdf3cec463849f1a32f653b6e2"
    "46b8b85a486ce3f604891501052c3d7bbee2155fff6a367e5a1f03"
)
WELCOME_JSON_WELCOME_1 = (
    "000100014076208e1faada70f08b91ef7f7f79ed1da917d9ce3cea5e5ce22e4a8b10f4311559dd204876537cd96eb996e67b23e936f09a701e"
    "6c634c43e5c08fa9cec0f2cc9ab4683362a74fa6274c733a29cabc3bb21ddbfac56d29aaebc1f4d87d6d815a9a7eede3c04be6e9930101aaeb"
    "b4cacaad143cb987d35340e86c14ae934a8a4fb97e08562fdbd7134ae98dae6be3d0512cf4fee3e492f4011797342d3e5ad0c5e20de763bcc1"
    "806824b6262259d23d9cd0cc9850b733cdb71c626da24bc6c526d1b160e2c1a37a5a304cfa78649514344d509e60037673427676a78f6ab6c5"
    "92c92e3677a86d238b19f9ffbb0cb40d9231d24bf84fc900fd4169aa63ff0edb7a00950349cfbc571fb6f341e6cdf485a61a8ddbb6a875f5fd"
    "53eb0955c16f81f0d3775b2b9296bc6bd744eb676b83e344add3135a1de9f3ad739a4eff78ab4d631013cfd7fbcaed3f0eb26832cb4910f97c"
    "9faa10ed6bad81ddd801e6ff1ff58f28"
)
WELCOME_JSON_KEY_PACKAGE_4 = (
    "0001000438910899bb8cf5119db62fa7623e2d10b4acead1642d2771076d47e636fafb030a2b13115be8e40fb5ec5a6f2f6bb7fee4932a59db"
    "049ea249386fe5b472882ffdf2d66f13e2ffe1e2adffe922590c41db4f2475c6b26970b0ed8818b1b32a98836c1e992a897bcd022926cca3a5"
    "d95e365239dd74bf8437798c93b47a329dcfc97abe22f1d6b0ac9323c40253da4ebd2754cb0a0a49509763e19024c5d7c26c45159f11693fc9"
    "5657fe58800001404059974da22a85557c27beb8e7c1945d8b0359dab007cdb2743bf65a50f683f0eeee79aefab0fa9586ea367aa5d74913d9"
    "9fb5b02aa270c43bf9a7102aa4f3db720200010c00010002000300040005000600000400010002010000000000000000ffffffffffffffff00"
    "40725ac121de82eecd7d1cea387987370a56dd69b70240e7b4893d61606be5bbff6071f4979dfacf5fee8b98f2fa9851cb190ac16dc078272c"
    "3c006cc79ae5e6dd64486df7ab19b46d05d8a5b8066b494fe4a3c50111acb11c1d1131f38d929f216b7963796ead44c53738ddf15f3b44ad1a"
    "1b0000407279023014eb7c341ce99f996ac6ab73e128ada328832880771995d1951c80846f583348dad19f2270a858df8c48da5ef8712df78a"
    "749e4d7b005cf3ca330515a654aa9bb1a9d7323d32ec57ea148f7c21491da4f60ac96e5ba986615b3d4f6d82001af5783c0f46afe931947a91"
    "e222e70400"
)
WELCOME_JSON_KEY_PACKAGE_7 = (
    "000100074061043ddeaa6c7571b023bb673ae4883f4110f1bc818fdc67319f02686618761d605db4ae669c0e1c7da064314d9b8acc004a525c"
    "2598fc71a73921863cf41af8dcf1ea5e7b1995b649d2d13c9d527411a6884c6c2eba4ae565e126c934a7e8ef5cc7406104519f1802f27c548f"
    "9e60d59a6bb6a88f77f91d7f7f4dc0eab34625458a608b0ce17ae1df9098f56eb64ad8ff01a2d1cd6526c2c8db886e5f719c0702fee316d4b8"
    "eda193b0e4bfb5edd29b8ca516714ed9c4a2917ad168bc08f13253e2de33d3406104369a04073d00527522f2e284e913463b462f2a589a3a6d"
    "879d5881d1e77e845d73eef72e1ea0c1ba55654e66264721e3fb7f8c713163b8faad02f038f8692aad424cd46e32076b795b26e7e8b24ce375"
    "128bacff50f37606bd1b969b56199760000130970ef250f11996c7e9cf3171cf592d120f4d99be75df24a28a540520a63d30c8a739ffaf595f"
    "f0d851f5befd141d4b2a0200010c00010002000300040005000600000400010002010000000000000000ffffffffffffffff00406730650230"
    "301dfe995c94b2c3c48cb9c29093494218699c5ee525a06c3542d891476df6d6833365ef66df8ca6ea77ffa277dcc5480231009b1ac0e76cf6"
    "321bace1c06493f337999d0caf531bfffc0e4a6a2a66dcb765eba581b33b9b7162d33bd522f550441a310040673065023100fe9704d0ef8b89"
    "2f5d1586ba6f3c01816c16e7041f876ebc54b7b484d58c04eedc2874ecf535fe1c56c0650f98a1b67a02306c20ed040f101965f4c39f827964"
    "cace397e154c3536fa1c441584dd6895446f60b62ed1d38d45b4f6d887b56411456b"
)

WELCOME_JSON_REFS = {
    1: "8e1faada70f08b91ef7f7f79ed1da917d9ce3cea5e5ce22e4a8b10f4311559dd",
    4: "983a8117c3f7a804ea63072f19fc511103baa666c87c3ad2a31760d3ee728344"
    "426335093aeb8dd21447f94e5752d2be430aa39160df31c2fcb50e1d7b4f2534",
    7: "61d85ef362c772d86b5bdae6b0f8fa3c76e3739862b1548f6188a049ad07b9fbfc31731ea1dc0c7102e25b68101ffb49",
}
WELCOME_JSON_KEY_PACKAGES = {
    1: WELCOME_JSON_KEY_PACKAGE_1,
    4: WELCOME_JSON_KEY_PACKAGE_4,
    7: WELCOME_JSON_KEY_PACKAGE_7,
}


def published(entry: int, name: str) -> bytes:
    return bytes.fromhex(MESSAGES_JSON[entry][name])


SIGNING_KEY = nacl.signing.SigningKey(b"\x05" * 32)
GROUP = b"group-1"


def key_package(identity: bytes = b"bob", *, wrap: bool = False, cipher_suite: int = 1) -> bytes:
    return make_key_package(
        SIGNING_KEY,
        identity=identity,
        cipher_suite=cipher_suite,
        not_before=1_700_000_000,
        not_after=1_800_000_000,
        init_key=b"\x11" * 32,
        encryption_key=b"\x22" * 32,
        wrap=wrap,
    )


def leaf_node(source: bytes, *, group_id: typing.Optional[bytes] = GROUP) -> bytes:
    return encode_leaf_node(
        SIGNING_KEY,
        encryption_key=b"\x33" * 32,
        credential=encode_basic_credential(b"alice"),
        capabilities=encode_capabilities(Capabilities((1,), (1,), (), (), (1,))),
        source=source,
        group_id=group_id,
        leaf_index=0,
    )


PROPOSALS = {
    PROPOSAL_ADD: encode_add_proposal(key_package()),
    PROPOSAL_UPDATE: encode_update_proposal(leaf_node(encode_update_source())),
    PROPOSAL_REMOVE: encode_remove_proposal(7),
    PROPOSAL_PSK: encode_psk_proposal(encode_external_psk_id(b"psk-id", b"n" * 32)),
    PROPOSAL_REINIT: encode_reinit_proposal(group_id=b"next", cipher_suite=3, extensions=[(3, b"\x00\x00\x00")]),
    PROPOSAL_EXTERNAL_INIT: encode_external_init_proposal(b"k" * 32),
    PROPOSAL_GROUP_CONTEXT_EXTENSIONS: encode_group_context_extensions_proposal([(5, b"senders")]),
}

UPDATE_PATH = encode_update_path(
    leaf_node(encode_commit_source(b"p" * 32)),
    [
        encode_update_path_node(b"\x44" * 32, [(b"\x55" * 32, b"c" * 48)]),
        encode_update_path_node(b"\x66" * 32, [(b"\x77" * 32, b"d" * 48), (b"\x88" * 32, b"e" * 48)]),
        encode_update_path_node(b"\x99" * 32, []),
    ],
)


def public_proposal(proposal: bytes, **kwargs: typing.Any) -> bytes:
    return make_public_proposal(group_id=GROUP, epoch=5, proposal=proposal, **kwargs)


def public_commit(**kwargs: typing.Any) -> bytes:
    return make_public_commit(group_id=GROUP, epoch=5, **kwargs)


def group_info(**kwargs: typing.Any) -> bytes:
    return make_group_info(SIGNING_KEY, group_id=GROUP, epoch=3, **kwargs)


def welcome(**kwargs: typing.Any) -> bytes:
    refs = kwargs.pop("key_package_refs", [b"r" * 32, b"s" * 32])
    return make_welcome(cipher_suite=kwargs.pop("cipher_suite", 1), key_package_refs=refs, **kwargs)


FULL_COMMIT = public_commit(
    proposals=[
        encode_proposal_by_value(PROPOSALS[PROPOSAL_ADD]),
        encode_proposal_by_reference(b"\xab" * 32),
        encode_proposal_by_value(PROPOSALS[PROPOSAL_REMOVE]),
        encode_proposal_by_value(PROPOSALS[PROPOSAL_PSK]),
    ],
    path=UPDATE_PATH,
    authenticated_data=b"aad",
)

Parser = typing.Callable[[bytes], object]

# (parser, a valid message for it) for the refusal tests.
VALID: list[tuple[Parser, bytes]] = [
    (parse_group_info, group_info(extensions=[(2, b"tree"), (4, b"x" * 32)], group_context_extensions=[(3, b"")])),
    (parse_group_info, published(0, "mls_group_info")),
    (parse_welcome, welcome()),
    (parse_welcome, published(1, "mls_welcome")),
    (parse_handshake, make_private_message(group_id=GROUP, epoch=9, content_type=CONTENT_COMMIT)),
    (parse_handshake, published(0, "private_message")),
    (parse_handshake, FULL_COMMIT),
    (parse_handshake, public_commit()),
    (parse_handshake, published(0, "public_message_commit")),
    (parse_handshake, published(1, "public_message_proposal")),
    *((parse_handshake, public_proposal(p)) for p in PROPOSALS.values()),
    (parse_handshake, public_proposal(PROPOSALS[PROPOSAL_REMOVE], sender_type=SENDER_EXTERNAL, sender_index=1)),
    (parse_handshake, public_proposal(PROPOSALS[PROPOSAL_ADD], sender_type=SENDER_NEW_MEMBER_PROPOSAL)),
    (parse_handshake, public_commit(sender_type=SENDER_NEW_MEMBER_COMMIT, path=UPDATE_PATH)),
]
VALID_IDS = [f"{p.__name__}-{i}" for i, (p, _) in enumerate(VALID)]


def error_of(parser: Parser, data: bytes) -> MLSMessageError:
    with pytest.raises(MLSMessageError) as info:
        parser(data)
    return info.value


class TestPublishedVectors:
    @pytest.mark.parametrize("entry", [0, 1])
    def test_group_info(self, entry):
        info = parse_group_info(published(entry, "mls_group_info"))
        assert (info.version, info.cipher_suite, info.epoch, info.signer) == (1, 1, 0, 0)
        assert info.group_id == bytes.fromhex(GROUP_IDS[entry])
        assert info.group_context_extensions == (Extension(3, b"\x00\x00\x00"),)
        assert [e.extension_type for e in info.extensions] == [2, 4]
        # The signer's key is leaf 0's in the ratchet_tree extension.
        key = bytes.fromhex(SIGNER_KEYS[entry])
        assert key in info.extensions[0].extension_data
        assert verify_group_info_signature(info, key)
        assert not verify_group_info_signature(info, bytes.fromhex(SIGNER_KEYS[1 - entry]))
        data = bytearray(published(entry, "mls_group_info"))
        data[-1] ^= 1
        assert not verify_group_info_signature(parse_group_info(bytes(data)), key)

    @pytest.mark.parametrize("entry", [0, 1])
    def test_welcome(self, entry):
        summary = parse_welcome(published(entry, "mls_welcome"))
        assert summary.cipher_suite == 1
        assert len(summary.new_members) == 1
        assert summary.new_members[0].hex() == MESSAGES_JSON[entry]["mls_welcome"][18:82]

    @pytest.mark.parametrize("entry", [0, 1])
    def test_public_proposal(self, entry):
        summary = parse_handshake(published(entry, "public_message_proposal"))
        assert summary == HandshakeSummary(
            WIRE_FORMAT_PUBLIC_MESSAGE,
            bytes.fromhex(GROUP_IDS[entry]),
            0,
            CONTENT_PROPOSAL,
            sender_type=SENDER_MEMBER,
            sender_index=0,
            proposal_type=PROPOSAL_ADD,
        )

    @pytest.mark.parametrize("entry", [0, 1])
    def test_public_commit(self, entry):
        summary = parse_handshake(published(entry, "public_message_commit"))
        assert summary == HandshakeSummary(
            WIRE_FORMAT_PUBLIC_MESSAGE,
            bytes.fromhex(GROUP_IDS[entry]),
            0,
            CONTENT_COMMIT,
            sender_type=SENDER_MEMBER,
            sender_index=0,
        )

    @pytest.mark.parametrize(("entry", "content_type"), [(0, CONTENT_PROPOSAL), (1, CONTENT_COMMIT)])
    def test_private_message(self, entry, content_type):
        summary = parse_handshake(published(entry, "private_message"))
        assert summary == HandshakeSummary(
            WIRE_FORMAT_PRIVATE_MESSAGE, bytes.fromhex(GROUP_IDS[entry]), 0, content_type
        )

    @pytest.mark.parametrize("entry", [0, 1])
    def test_public_application(self, entry):
        """RFC 9420 section 6 forbids application data in a PublicMessage; the vector is for codecs."""
        data = published(entry, "public_message_application")
        err = error_of(parse_handshake, data)
        assert (err.offset, err.field) == (38, "public_message.content.content_type")
        assert "PrivateMessage" in err.reason
        summary = parse_handshake(data, allow_public_application=True)
        assert (summary.epoch, summary.content_type, summary.sender_index) == (1, CONTENT_APPLICATION, 0)

    @pytest.mark.parametrize("suite", [1, 4, 7])
    def test_key_package_ref(self, suite):
        kp = parse_key_package(bytes.fromhex(WELCOME_JSON_KEY_PACKAGES[suite]))
        assert kp.cipher_suite == suite
        assert verify_key_package_signature(kp) and verify_leaf_node_signature(kp)
        assert key_package_ref(kp).hex() == WELCOME_JSON_REFS[suite]

    def test_welcome_json_welcome(self):
        """The draft-era Welcome, framed as an RFC 9420 MLSMessage, names the KeyPackage by its ref."""
        data = bytes.fromhex(WELCOME_JSON_WELCOME_1)
        assert data[:2] == b"\x00\x01"
        summary = parse_welcome(mls_message(WIRE_FORMAT_WELCOME, data[2:]))
        kp = parse_key_package(bytes.fromhex(WELCOME_JSON_KEY_PACKAGE_1))
        assert summary == WelcomeSummary(1, (key_package_ref(kp),))


class TestKeyPackageRef:
    def test_independent_sha256(self):
        raw = key_package()
        assert 64 <= len(raw) < 16384
        label = b"MLS 1.0 KeyPackage Reference"
        ref_hash_input = bytes([len(label)]) + label + (0x4000 | len(raw)).to_bytes(2, "big") + raw
        expected = hashlib.sha256(ref_hash_input).digest()
        assert key_package_ref(parse_key_package(raw)) == expected
        # The MLSMessage header is not part of the reference.
        assert key_package_ref(parse_key_package_message(key_package(wrap=True))) == expected

    def test_suite_3(self):
        raw = key_package(cipher_suite=3)
        kp = parse_key_package(raw)
        label = b"MLS 1.0 KeyPackage Reference"
        assert key_package_ref(kp) == hashlib.sha256(vec(label) + vec(raw)).digest()

    def test_unknown_suite(self):
        raw = key_package()
        kp = parse_key_package(raw[:2] + u16(0xF0F0) + raw[4:])
        with pytest.raises(MLSMessageError, match="cipher suite 61680") as info:
            key_package_ref(kp)
        assert info.value.field == "cipher_suite"
        assert isinstance(info.value, ValueError)


class TestParse:
    def test_group_info(self):
        data = group_info(signer=4, group_context_extensions=[(3, b"abc")], extensions=[(2, b"tree")])
        info = parse_group_info(data)
        assert info == GroupInfoSummary(
            version=1,
            cipher_suite=1,
            group_id=GROUP,
            epoch=3,
            signer=4,
            group_context_extensions=(Extension(3, b"abc"),),
            extensions=(Extension(2, b"tree"),),
            signature=info.signature,
            to_be_signed=info.to_be_signed,
        )
        assert data == mls_message(WIRE_FORMAT_GROUP_INFO, info.to_be_signed + vec(info.signature))
        assert verify_group_info_signature(info, bytes(SIGNING_KEY.verify_key))
        assert "signature" not in repr(info)

    def test_group_info_unknown_suite(self):
        info = parse_group_info(group_info())
        info = GroupInfoSummary(1, 0xF0F0, GROUP, 3, 0, signature=info.signature, to_be_signed=info.to_be_signed)
        with pytest.raises(MLSMessageError, match="cannot verify"):
            verify_group_info_signature(info, bytes(SIGNING_KEY.verify_key))

    def test_welcome(self):
        refs = [b"r" * 32, b"s" * 32, b"t" * 32]
        assert parse_welcome(welcome(key_package_refs=refs)) == WelcomeSummary(1, tuple(refs))

    def test_welcome_unknown_suite(self):
        """An unregistered suite's refs and KEM outputs have no known size."""
        secrets = vec(b"x") + vec(b"k") + vec(b"c")
        data = mls_message(WIRE_FORMAT_WELCOME, u16(0xF0F0) + vec(secrets) + vec(b"gi"))
        assert parse_welcome(data) == WelcomeSummary(0xF0F0, (b"x",))

    @pytest.mark.parametrize("content_type", [CONTENT_APPLICATION, CONTENT_PROPOSAL, CONTENT_COMMIT])
    def test_private_message(self, content_type):
        data = make_private_message(group_id=GROUP, epoch=2**64 - 1, content_type=content_type, authenticated_data=b"x")
        assert parse_handshake(data) == HandshakeSummary(WIRE_FORMAT_PRIVATE_MESSAGE, GROUP, 2**64 - 1, content_type)

    @pytest.mark.parametrize("proposal_type", sorted(PROPOSALS))
    def test_every_proposal_type(self, proposal_type):
        summary = parse_handshake(public_proposal(PROPOSALS[proposal_type], sender_index=3))
        assert summary == HandshakeSummary(
            WIRE_FORMAT_PUBLIC_MESSAGE,
            GROUP,
            5,
            CONTENT_PROPOSAL,
            sender_type=SENDER_MEMBER,
            sender_index=3,
            proposal_type=proposal_type,
        )

    def test_resumption_psk(self):
        for usage in (1, 2, 3):
            proposal = encode_psk_proposal(encode_resumption_psk_id(usage, b"old", 9, b"n" * 32))
            assert parse_handshake(public_proposal(proposal)).proposal_type == PROPOSAL_PSK

    def test_empty_commit(self):
        summary = parse_handshake(public_commit())
        assert (summary.content_type, summary.sender_type, summary.sender_index) == (CONTENT_COMMIT, SENDER_MEMBER, 0)

    def test_full_commit(self):
        summary = parse_handshake(FULL_COMMIT)
        assert (summary.group_id, summary.epoch, summary.content_type) == (GROUP, 5, CONTENT_COMMIT)

    def test_every_proposal_in_a_commit(self):
        proposals = [encode_proposal_by_value(p) for p in PROPOSALS.values()]
        assert parse_handshake(public_commit(proposals=proposals)).content_type == CONTENT_COMMIT

    @pytest.mark.parametrize(
        ("sender_type", "content", "proposal_type"),
        [
            (SENDER_EXTERNAL, PROPOSALS[PROPOSAL_ADD], PROPOSAL_ADD),
            (SENDER_EXTERNAL, PROPOSALS[PROPOSAL_REMOVE], PROPOSAL_REMOVE),
            (SENDER_EXTERNAL, PROPOSALS[PROPOSAL_PSK], PROPOSAL_PSK),
            (SENDER_EXTERNAL, PROPOSALS[PROPOSAL_REINIT], PROPOSAL_REINIT),
            (SENDER_EXTERNAL, PROPOSALS[PROPOSAL_GROUP_CONTEXT_EXTENSIONS], PROPOSAL_GROUP_CONTEXT_EXTENSIONS),
            (SENDER_NEW_MEMBER_PROPOSAL, PROPOSALS[PROPOSAL_ADD], PROPOSAL_ADD),
        ],
    )
    def test_external_proposals(self, sender_type, content, proposal_type):
        summary = parse_handshake(public_proposal(content, sender_type=sender_type, sender_index=2))
        assert summary.sender_type == sender_type
        assert summary.sender_index == (2 if sender_type == SENDER_EXTERNAL else None)
        assert summary.proposal_type == proposal_type

    def test_new_member_commit(self):
        summary = parse_handshake(public_commit(sender_type=SENDER_NEW_MEMBER_COMMIT, path=UPDATE_PATH))
        assert (summary.sender_type, summary.sender_index) == (SENDER_NEW_MEMBER_COMMIT, None)

    def test_accepts_bytearray_and_memoryview(self):
        data = group_info()
        assert parse_group_info(bytearray(data)) == parse_group_info(memoryview(data))

    @pytest.mark.parametrize("parser", [parse_group_info, parse_handshake, parse_welcome])
    def test_not_bytes(self, parser):
        with pytest.raises(TypeError):
            parser(typing.cast(bytes, "00010004"))

    def test_largest_message(self):
        """A message of exactly MAX_MESSAGE_SIZE bytes is parsed."""
        # Everything but the ciphertext and its 4-byte length.
        fixed = len(make_private_message(group_id=GROUP, epoch=1, ciphertext=b"c" * 20000)) - 20000 - 4
        size = MAX_MESSAGE_SIZE - fixed - 4
        data = make_private_message(group_id=GROUP, epoch=1, ciphertext=b"c" * size)
        assert len(data) == MAX_MESSAGE_SIZE
        assert parse_handshake(data).epoch == 1


class TestRefusals:
    @pytest.mark.parametrize(("parser", "data"), VALID, ids=VALID_IDS)
    def test_every_truncation(self, parser, data):
        parser(data)
        for n in range(len(data)):
            err = error_of(parser, data[:n])
            assert "truncated" in err.reason or "beyond the data" in err.reason, (n, err)

    @pytest.mark.parametrize(("parser", "data"), VALID, ids=VALID_IDS)
    def test_trailing_bytes(self, parser, data):
        err = error_of(parser, data + b"\x00")
        assert err.offset == len(data)
        assert "1 trailing bytes" in err.reason

    @pytest.mark.parametrize(("parser", "data"), VALID, ids=VALID_IDS)
    @pytest.mark.parametrize("version", [0, 2, 0xFFFF])
    def test_bad_version(self, parser, data, version):
        err = error_of(parser, u16(version) + data[2:])
        assert (err.offset, err.field) == (0, "MLSMessage.version")
        assert f"unknown protocol version {version}" in err.reason

    @pytest.mark.parametrize(
        ("parser", "accepted"),
        [
            (parse_group_info, {WIRE_FORMAT_GROUP_INFO}),
            (parse_welcome, {WIRE_FORMAT_WELCOME}),
            (parse_handshake, {WIRE_FORMAT_PUBLIC_MESSAGE, WIRE_FORMAT_PRIVATE_MESSAGE}),
        ],
    )
    def test_wrong_wire_format(self, parser, accepted):
        for data in (group_info(), welcome(), public_commit(), make_private_message(group_id=GROUP, epoch=0)):
            for wire_format in (0, 1, 2, 3, 4, 5, 6, 0xF000):
                if wire_format in accepted:
                    continue
                err = error_of(parser, data[:2] + u16(wire_format) + data[4:])
                assert (err.offset, err.field) == (2, "MLSMessage.wire_format")
                assert f"wire format {wire_format} " in err.reason
        err = error_of(parser, key_package(wrap=True))
        assert f"wire format {WIRE_FORMAT_KEY_PACKAGE} (mls_key_package) is not" in err.reason

    @pytest.mark.parametrize("parser", [parse_group_info, parse_handshake, parse_welcome])
    def test_oversize_refused_up_front(self, parser):
        err = error_of(parser, b"\xff" * (MAX_MESSAGE_SIZE + 1))
        assert (err.offset, err.field) == (0, "MLSMessage")
        assert "over the limit" in err.reason
        data = make_private_message(group_id=GROUP, epoch=1, ciphertext=b"c" * MAX_MESSAGE_SIZE)
        assert "over the limit" in error_of(parse_handshake, data).reason

    @pytest.mark.parametrize("content_type", [0, 4, 255])
    def test_unknown_content_type_private(self, content_type):
        data = make_private_message(group_id=GROUP, epoch=1)
        at = 4 + len(vec(GROUP)) + 8
        err = error_of(parse_handshake, data[:at] + u8(content_type) + data[at + 1 :])
        assert (err.offset, err.field) == (at, "private_message.content_type")
        assert f"unknown content type {content_type}" in err.reason

    @pytest.mark.parametrize("content_type", [0, 4, 255])
    def test_unknown_content_type_public(self, content_type):
        data = public_commit(authenticated_data=b"")
        at = 4 + len(vec(GROUP)) + 8 + 5 + 1
        assert data[at] == CONTENT_COMMIT
        err = error_of(parse_handshake, data[:at] + u8(content_type) + data[at + 1 :])
        assert (err.offset, err.field) == (at, "public_message.content.content_type")

    def test_zero_secrets(self):
        data = mls_message(WIRE_FORMAT_WELCOME, u16(1) + EMPTY_VECTOR + vec(b"group info"))
        err = error_of(parse_welcome, data)
        assert err.field == "welcome.secrets"
        assert "at least one" in err.reason

    def test_welcome_ref_size(self):
        data = mls_message(WIRE_FORMAT_WELCOME, u16(1) + vec(vec(b"r" * 31) + vec(b"k" * 32) + vec(b"c")) + vec(b"g"))
        err = error_of(parse_welcome, data)
        assert (err.offset, err.field) == (8, "welcome.secrets[0].new_member")  # after a 2-byte secrets length
        assert "has 32" in err.reason
        with pytest.raises(ValueError, match="has 32 bytes"):
            welcome(key_package_refs=[b"r" * 31])

    def test_welcome_kem_output_size(self):
        secrets = vec(b"r" * 64) + vec(b"k" * 32) + vec(b"c")
        err = error_of(parse_welcome, mls_message(WIRE_FORMAT_WELCOME, u16(4) + vec(secrets) + vec(b"g")))
        assert err.field == "welcome.secrets[0].encrypted_group_secrets.kem_output"
        assert "has 56" in err.reason

    @pytest.mark.parametrize(
        "field", ["new_member", "encrypted_group_secrets.kem_output", "encrypted_group_secrets.ciphertext"]
    )
    def test_welcome_empty_fields(self, field):
        parts = {"new_member": b"r" * 32, "encrypted_group_secrets.kem_output": b"k" * 32}
        parts["encrypted_group_secrets.ciphertext"] = b"c"
        parts[field] = b""
        secrets = b"".join(vec(v) for v in parts.values())
        err = error_of(parse_welcome, mls_message(WIRE_FORMAT_WELCOME, u16(1) + vec(secrets) + vec(b"g")))
        assert (err.field, err.reason) == (f"welcome.secrets[0].{field}", "empty")

    def test_welcome_empty_group_info(self):
        data = welcome()
        err = error_of(parse_welcome, data[:-258] + EMPTY_VECTOR)
        assert (err.field, err.reason) == ("welcome.encrypted_group_info", "empty")

    def test_group_context_version(self):
        data = group_info()
        err = error_of(parse_group_info, data[:4] + u16(2) + data[6:])
        assert (err.offset, err.field) == (4, "group_info.group_context.version")

    def test_group_info_duplicate_extension(self):
        err = error_of(parse_group_info, group_info(extensions=[(2, b"a"), (2, b"b")]))
        assert err.field == "group_info.extensions"
        assert "duplicate" in err.reason

    def test_group_info_empty_signature_and_tag(self):
        data = group_info()
        err = error_of(parse_group_info, data[:-66] + EMPTY_VECTOR)
        assert (err.field, err.reason) == ("group_info.signature", "empty")
        err = error_of(parse_group_info, group_info(confirmation_tag=b""))
        assert (err.field, err.reason) == ("group_info.confirmation_tag", "empty")

    @pytest.mark.parametrize("sender_type", [0, 5, 255])
    def test_unknown_sender_type(self, sender_type):
        data = public_commit()
        at = 4 + len(vec(GROUP)) + 8
        err = error_of(parse_handshake, data[:at] + u8(sender_type) + data[at + 1 :])
        assert (err.offset, err.field) == (at, "public_message.content.sender.sender_type")

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (public_commit(sender_type=SENDER_EXTERNAL), "external senders send proposals, not commit"),
            (public_commit(sender_type=SENDER_NEW_MEMBER_PROPOSAL), "new_member_proposal senders send proposals"),
            (
                public_proposal(PROPOSALS[PROPOSAL_ADD], sender_type=SENDER_NEW_MEMBER_COMMIT),
                "new_member_commit senders send commits, not proposal",
            ),
            (
                make_public_message(
                    group_id=GROUP, epoch=1, content_type=CONTENT_APPLICATION, content=vec(b"hi"), sender_type=2
                ),
                "application data must be sent as a PrivateMessage",
            ),
        ],
    )
    def test_sender_and_content_type(self, data, reason):
        err = error_of(parse_handshake, data)
        assert err.field == "public_message.content.content_type"
        assert reason in err.reason

    @pytest.mark.parametrize("proposal_type", [PROPOSAL_UPDATE, PROPOSAL_EXTERNAL_INIT])
    def test_proposal_types_external_senders_may_not_send(self, proposal_type):
        data = public_proposal(PROPOSALS[proposal_type], sender_type=SENDER_EXTERNAL)
        err = error_of(parse_handshake, data)
        assert err.field == "public_message.content.proposal.proposal_type"
        assert "external senders may not send" in err.reason

    @pytest.mark.parametrize("proposal_type", [PROPOSAL_REMOVE, PROPOSAL_PSK])
    def test_new_member_proposals_are_adds(self, proposal_type):
        data = public_proposal(PROPOSALS[proposal_type], sender_type=SENDER_NEW_MEMBER_PROPOSAL)
        err = error_of(parse_handshake, data)
        assert "send add proposals" in err.reason

    @pytest.mark.parametrize("proposal_type", [0, 8, 0x0A0A, 0xF000])
    def test_unknown_proposal_type(self, proposal_type):
        err = error_of(parse_handshake, public_proposal(u16(proposal_type) + b"\x00"))
        assert err.field == "public_message.content.proposal.proposal_type"
        assert f"unsupported proposal type {proposal_type}" in err.reason
        data = public_commit(proposals=[encode_proposal_by_value(u16(proposal_type))])
        err = error_of(parse_handshake, data)
        assert err.field == "public_message.content.commit.proposals[0].proposal.proposal_type"

    def test_unknown_proposal_or_ref_type(self):
        err = error_of(parse_handshake, public_commit(proposals=[u8(3) + vec(b"x")]))
        assert err.field == "public_message.content.commit.proposals[0].type"

    def test_empty_proposal_reference(self):
        data = public_commit(proposals=[encode_proposal_by_reference(b"r" * 32), encode_proposal_by_reference(b"")])
        err = error_of(parse_handshake, data)
        assert (err.field, err.reason) == ("public_message.content.commit.proposals[1].reference", "empty")

    def test_nested_key_package_error(self):
        """A bad KeyPackage in an Add is an MLSMessageError naming the whole path."""
        kp = key_package()
        bad = kp[:4] + vec(b"\x11" * 31) + kp[4 + 33 :]
        err = error_of(parse_handshake, public_proposal(encode_add_proposal(bad)))
        assert not isinstance(err, KeyPackageError)
        assert err.field == "public_message.content.proposal.add.init_key"
        assert "uses 32" in err.reason
        # A KeyPackage cut short in a commit's proposal list overruns the list.
        data = public_commit(proposals=[encode_proposal_by_value(encode_add_proposal(kp[:-1]))])
        err = error_of(parse_handshake, data)
        assert err.field.startswith("public_message.content.commit.proposals[0].proposal.add.")

    def test_nested_credential_error(self):
        leaf = encode_leaf_node(
            SIGNING_KEY,
            encryption_key=b"e" * 32,
            credential=u16(9) + vec(b"?"),
            capabilities=encode_capabilities(Capabilities((1,), (1,), (), (), (1,))),
            source=encode_update_source(),
        )
        err = error_of(parse_handshake, public_proposal(encode_update_proposal(leaf)))
        assert err.field == "public_message.content.proposal.update.leaf_node.credential.credential_type"

    @pytest.mark.parametrize(
        "source", [encode_key_package_source(1, 2), encode_commit_source(b"p"), b"\x00", b"\x07"]
    )
    def test_update_leaf_node_source(self, source):
        err = error_of(parse_handshake, public_proposal(encode_update_proposal(leaf_node(source))))
        assert err.field == "public_message.content.proposal.update.leaf_node.leaf_node_source"
        assert "an Update proposal needs update (2)" in err.reason

    @pytest.mark.parametrize("source", [encode_key_package_source(1, 2), encode_update_source(), b"\x00"])
    def test_update_path_leaf_node_source(self, source):
        path = encode_update_path(leaf_node(source), [])
        err = error_of(parse_handshake, public_commit(path=path))
        assert err.field == "public_message.content.commit.path.leaf_node.leaf_node_source"
        assert "an UpdatePath needs commit (3)" in err.reason

    def test_update_path_node_errors(self):
        path = encode_update_path(leaf_node(encode_commit_source(b"")), [encode_update_path_node(b"k", [(b"", b"c")])])
        err = error_of(parse_handshake, public_commit(path=path))
        assert err.field == "public_message.content.commit.path.nodes[0].encrypted_path_secret[0].kem_output"
        path = encode_update_path(leaf_node(encode_commit_source(b"")), [encode_update_path_node(b"", [])])
        err = error_of(parse_handshake, public_commit(path=path))
        assert err.field == "public_message.content.commit.path.nodes[0].encryption_key"

    @pytest.mark.parametrize("present", [2, 255])
    def test_optional_presence_octet(self, present):
        data = public_commit()
        at = len(data) - 1 - 66 - 33 - 33  # before signature<V>, confirmation_tag<V>, membership_tag<V>
        assert data[at] == 0
        err = error_of(parse_handshake, data[:at] + u8(present) + data[at + 1 :])
        assert (err.offset, err.field) == (at, "public_message.content.commit.path")
        assert "neither 0 nor 1" in err.reason

    def test_unknown_psk_type_and_usage(self):
        err = error_of(parse_handshake, public_proposal(encode_psk_proposal(u8(3) + vec(b"id") + vec(b"n"))))
        assert err.field == "public_message.content.proposal.psk.psk.psktype"
        proposal = encode_psk_proposal(encode_resumption_psk_id(4, b"g", 1, b"n"))
        err = error_of(parse_handshake, public_proposal(proposal))
        assert err.field == "public_message.content.proposal.psk.psk.usage"
        assert "unknown resumption PSK usage 4" in err.reason

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"signature": b""}, "public_message.auth.signature"),
            ({"confirmation_tag": b""}, "public_message.auth.confirmation_tag"),
            ({"membership_tag": b""}, "public_message.membership_tag"),
        ],
    )
    def test_empty_authentication(self, kwargs, field):
        err = error_of(parse_handshake, public_commit(**kwargs))
        assert (err.field, err.reason) == (field, "empty")

    def test_private_message_empty_ciphertexts(self):
        data = make_private_message(group_id=GROUP, epoch=1, ciphertext=b"c")
        err = error_of(parse_handshake, data[:-2] + EMPTY_VECTOR)
        assert (err.field, err.reason) == ("private_message.ciphertext", "empty")
        data = make_private_message(group_id=GROUP, epoch=1, encrypted_sender_data=b"s", ciphertext=b"c")
        err = error_of(parse_handshake, data[:-4] + EMPTY_VECTOR + vec(b"c"))
        assert (err.field, err.reason) == ("private_message.encrypted_sender_data", "empty")

    def test_non_minimal_and_invalid_lengths(self):
        data = make_private_message(group_id=GROUP, epoch=1)
        err = error_of(parse_handshake, data[:4] + b"\x40\x07" + data[5:])
        assert (err.offset, err.field) == (4, "private_message.group_id")
        assert "not minimally encoded" in err.reason
        err = error_of(parse_handshake, data[:4] + b"\xc0" + data[5:])
        assert "0b11" in err.reason

    def test_error_shape(self):
        err = error_of(parse_welcome, b"")
        assert str(err) == "invalid MLS message at offset 0 (MLSMessage.version): truncated: needs 2 bytes, 0 left"
        assert isinstance(err, MLSDecodeError) and isinstance(err, ValueError)
        assert issubclass(KeyPackageError, MLSDecodeError)
        assert not issubclass(KeyPackageError, MLSMessageError)


FUZZ = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
PARSERS: list[Parser] = [parse_group_info, parse_handshake, parse_welcome]


def parse_or_refuse(parser: Parser, data: bytes) -> None:
    """Parse; an MLSMessageError is fine, anything else fails the test."""
    try:
        summary = parser(data)
    except MLSMessageError as e:
        assert str(e).startswith("invalid MLS message at offset ")
        assert 0 <= e.offset <= len(data)
        return
    assert parser(data) == summary


class TestFuzz:
    @FUZZ
    @given(st.sampled_from(PARSERS), st.binary(max_size=1024))
    def test_random_bytes(self, parser, data):
        parse_or_refuse(parser, data)

    @FUZZ
    @given(st.sampled_from(PARSERS), st.integers(min_value=0, max_value=6), st.binary(max_size=512))
    def test_random_after_valid_header(self, parser, wire_format, tail):
        parse_or_refuse(parser, u16(1) + u16(wire_format) + tail)

    @FUZZ
    @given(st.sampled_from(VALID), MUTATIONS)
    def test_mutated_messages(self, valid, mutations):
        parser, data = valid
        parse_or_refuse(parser, mutate(data, mutations))

    @FUZZ
    @given(
        st.sampled_from(VALID),
        st.integers(min_value=0, max_value=2000),
        st.sampled_from([b"\x7f\xff", b"\xbf\xff\xff\xff", b"\xc0", b"\x00", b"\x01", b"\x02"]),
    )
    def test_spliced(self, valid, pos, insert):
        parser, data = valid
        i = pos % len(data)
        parse_or_refuse(parser, data[:i] + insert + data[i:])
        parse_or_refuse(parser, data[:i] + insert + data[i + len(insert) :])
