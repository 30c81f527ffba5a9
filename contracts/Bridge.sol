// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title Bridge — attested messages from task chains into this chain.
/// @notice Deployed on a destination chain (chain B) by its governance (the admin). The admin
///         registers *sources*: a task ledger on another chain, identified by (chain id, ledger
///         address), together with the members of that task allowed to sign and a quorum k.
///         Anyone may then relay a message from a source — e.g. the digest of the global model of a
///         closed round, for warm start or regularization of a task on this chain — and it is
///         accepted only with signatures of at least k distinct registered signers. Trust comes from
///         the signatures, never from the relayer.
/// @dev Rules (see contracts/README.md):
///      - Signatures are 65-byte (r, s, v) ECDSA signatures, v in {27, 28}, s in the lower half of
///        the curve order, over the EIP-712 hash of the message fields (the inline payload is bound
///        through `digest`, checked with sha256 when present) under the domain
///        (name "medchain Bridge", version "1", block.chainid, address(this)): a signature for one
///        bridge cannot be replayed on another bridge or chain.
///      - The message id is the EIP-712 struct hash; a message is accepted at most once.
///      - Every signature must come from a registered signer of the message's source, no signer
///        twice; otherwise the whole relay reverts (nothing is recorded).
contract Bridge {
    // ------------------------------------------------------------------ types
    struct Message {
        uint256 sourceChainId;
        address sourceLedger;
        uint32 sourceRound;
        bytes32 digest;      // sha256 of the payload (for a global model: the attested model digest)
        uint8 kind;          // 1 = global model (warm start / regularization); others: by convention
        uint64 payloadSize;  // bytes of the payload, inline or in a blob store
        bytes payload;       // optional inline payload (empty: the payload lives in a blob store)
    }

    /// @notice What the bridge keeps of an accepted message (acceptedBlock 0 = not accepted).
    struct Record {
        uint256 sourceChainId;
        address sourceLedger;
        uint32 sourceRound;
        uint8 kind;
        bool inlinePayload;
        bytes32 digest;
        uint64 payloadSize;
        uint64 acceptedBlock;
        uint16 signerCount;
    }

    struct Source {
        bool registered;
        uint32 quorum;
        address[] signers;
        mapping(address => bool) isSigner;
    }

    // ------------------------------------------------------------------ errors
    error NotBridgeAdmin(address caller);
    error InvalidSource(uint256 chainId, address ledger);
    error InvalidQuorum(uint256 quorum, uint256 signerCount);
    error InvalidSigner(address signer);
    error RepeatedSigner(address signer);
    error UnknownSource(uint256 sourceChainId, address sourceLedger);
    error ZeroDigest();
    error PayloadSizeMismatch(uint64 payloadSize, uint256 inlineLength);
    error PayloadMismatch(bytes32 digest, bytes32 payloadSha256);
    error AlreadyAccepted(bytes32 id);
    error SignatureWrongLength(uint256 index, uint256 length);
    error SignatureHighS(uint256 index);
    error SignatureBadV(uint256 index, uint8 v);
    error SignatureUnrecoverable(uint256 index);
    error UnknownSigner(uint256 index, address signer);
    error DuplicateSigner(uint256 index, address signer);
    error BelowQuorum(uint256 valid, uint256 quorum);

    // ------------------------------------------------------------------ events
    event SourceRegistered(uint256 indexed chainId, address indexed ledger, address[] signers, uint32 quorum);
    event SourceRemoved(uint256 indexed chainId, address indexed ledger);
    event MessageAccepted(
        bytes32 indexed id,
        uint256 sourceChainId,
        address sourceLedger,
        uint32 sourceRound,
        bytes32 digest,
        uint8 kind
    );
    /// @notice Emitted with every MessageAccepted: who relayed it, who signed it, and the inline
    ///         payload (empty when it lives in a blob store).
    event MessageRelayed(bytes32 indexed id, address indexed relayer, address[] signers, uint64 payloadSize,
                         bytes payload);

    // ------------------------------------------------------------------ constants
    string public constant NAME = "medchain Bridge";
    string public constant VERSION = "1";
    bytes32 public constant MESSAGE_TYPEHASH = keccak256(
        "Message(uint256 sourceChainId,address sourceLedger,uint32 sourceRound,bytes32 digest,uint8 kind,"
        "uint64 payloadSize)"
    );
    bytes32 private constant _DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    uint256 private constant _HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    // ------------------------------------------------------------------ state
    address public immutable admin;
    uint64 public immutable deployBlock;

    mapping(bytes32 => Source) private _sources;
    uint256[] private _sourceChainIds;
    address[] private _sourceLedgers;
    mapping(bytes32 => uint256) private _sourceIndex; // index + 1; 0 = not registered
    mapping(bytes32 => Record) private _records;

    constructor() {
        admin = msg.sender;
        deployBlock = uint64(block.number);
    }

    modifier onlyAdmin() {
        if (msg.sender != admin) revert NotBridgeAdmin(msg.sender);
        _;
    }

    // ------------------------------------------------------------------ governance
    /// @notice Registers (or replaces) the source (chainId, ledger): its signers and quorum.
    function registerSource(uint256 chainId, address ledger, address[] calldata signers_, uint32 quorum_)
        external
        onlyAdmin
    {
        if (chainId == 0 || ledger == address(0)) revert InvalidSource(chainId, ledger);
        if (quorum_ == 0 || quorum_ > signers_.length) revert InvalidQuorum(quorum_, signers_.length);
        bytes32 key = _key(chainId, ledger);
        Source storage s = _sources[key];
        uint256 old = s.signers.length;
        for (uint256 i = 0; i < old; i++) s.isSigner[s.signers[i]] = false;
        delete s.signers;
        for (uint256 i = 0; i < signers_.length; i++) {
            address a = signers_[i];
            if (a == address(0)) revert InvalidSigner(a);
            if (s.isSigner[a]) revert RepeatedSigner(a);
            s.isSigner[a] = true;
            s.signers.push(a);
        }
        s.quorum = quorum_;
        if (!s.registered) {
            s.registered = true;
            _sourceChainIds.push(chainId);
            _sourceLedgers.push(ledger);
            _sourceIndex[key] = _sourceChainIds.length;
        }
        emit SourceRegistered(chainId, ledger, signers_, quorum_);
    }

    /// @notice Removes a source; messages accepted from it stay recorded.
    function removeSource(uint256 chainId, address ledger) external onlyAdmin {
        bytes32 key = _key(chainId, ledger);
        Source storage s = _sources[key];
        if (!s.registered) revert UnknownSource(chainId, ledger);
        uint256 n = s.signers.length;
        for (uint256 i = 0; i < n; i++) s.isSigner[s.signers[i]] = false;
        delete s.signers;
        s.quorum = 0;
        s.registered = false;
        uint256 idx = _sourceIndex[key];
        uint256 len = _sourceChainIds.length;
        for (uint256 i = idx; i < len; i++) {
            _sourceChainIds[i - 1] = _sourceChainIds[i];
            _sourceLedgers[i - 1] = _sourceLedgers[i];
            _sourceIndex[_key(_sourceChainIds[i], _sourceLedgers[i])] = i;
        }
        _sourceChainIds.pop();
        _sourceLedgers.pop();
        delete _sourceIndex[key];
        emit SourceRemoved(chainId, ledger);
    }

    // ------------------------------------------------------------------ relay
    /// @notice Accepts `m` if `signatures` hold at least `quorum` valid signatures by distinct
    ///         registered signers of its source. Anyone may call it. Returns the message id.
    function relay(Message calldata m, bytes[] calldata signatures) external returns (bytes32 id) {
        Source storage s = _sources[_key(m.sourceChainId, m.sourceLedger)];
        if (!s.registered) revert UnknownSource(m.sourceChainId, m.sourceLedger);
        if (m.digest == bytes32(0)) revert ZeroDigest();
        if (m.payload.length != 0) {
            if (m.payload.length != m.payloadSize) revert PayloadSizeMismatch(m.payloadSize, m.payload.length);
            bytes32 h = sha256(m.payload);
            if (h != m.digest) revert PayloadMismatch(m.digest, h);
        }
        id = messageId(m);
        if (_records[id].acceptedBlock != 0) revert AlreadyAccepted(id);

        bytes32 signed = keccak256(abi.encodePacked("\x19\x01", domainSeparator(), id));
        uint256 n = signatures.length;
        address[] memory seen = new address[](n);
        for (uint256 i = 0; i < n; i++) {
            address signer = _recover(signed, signatures[i], i);
            if (!s.isSigner[signer]) revert UnknownSigner(i, signer);
            for (uint256 j = 0; j < i; j++) {
                if (seen[j] == signer) revert DuplicateSigner(i, signer);
            }
            seen[i] = signer;
        }
        if (n < s.quorum) revert BelowQuorum(n, s.quorum);

        _records[id] = Record({
            sourceChainId: m.sourceChainId,
            sourceLedger: m.sourceLedger,
            sourceRound: m.sourceRound,
            kind: m.kind,
            inlinePayload: m.payload.length != 0,
            digest: m.digest,
            payloadSize: m.payloadSize,
            acceptedBlock: uint64(block.number),
            signerCount: uint16(n)
        });
        emit MessageAccepted(id, m.sourceChainId, m.sourceLedger, m.sourceRound, m.digest, m.kind);
        emit MessageRelayed(id, msg.sender, seen, m.payloadSize, m.payload);
    }

    function _recover(bytes32 h, bytes calldata sig, uint256 index) private pure returns (address) {
        if (sig.length != 65) revert SignatureWrongLength(index, sig.length);
        bytes32 r = bytes32(sig[0:32]);
        bytes32 s = bytes32(sig[32:64]);
        uint8 v = uint8(sig[64]);
        if (uint256(s) > _HALF_ORDER) revert SignatureHighS(index);
        if (v != 27 && v != 28) revert SignatureBadV(index, v);
        address a = ecrecover(h, v, r, s);
        if (a == address(0)) revert SignatureUnrecoverable(index);
        return a;
    }

    function _key(uint256 chainId, address ledger) private pure returns (bytes32) {
        return keccak256(abi.encode(chainId, ledger));
    }

    // ------------------------------------------------------------------ hashing
    /// @notice The message id: the EIP-712 struct hash of the message fields (payload excluded:
    ///         it is bound by `digest`).
    function messageId(Message calldata m) public pure returns (bytes32) {
        return keccak256(abi.encode(MESSAGE_TYPEHASH, m.sourceChainId, m.sourceLedger, m.sourceRound, m.digest,
                                    m.kind, m.payloadSize));
    }

    /// @notice The EIP-712 domain separator of this bridge on this chain.
    function domainSeparator() public view returns (bytes32) {
        return keccak256(abi.encode(_DOMAIN_TYPEHASH, keccak256(bytes(NAME)), keccak256(bytes(VERSION)),
                                    block.chainid, address(this)));
    }

    /// @notice The hash the signers sign: keccak256("\x19\x01" ‖ domainSeparator ‖ messageId).
    function signingHash(Message calldata m) external view returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", domainSeparator(), messageId(m)));
    }

    // ------------------------------------------------------------------ views
    function accepted(bytes32 id) external view returns (bool) {
        return _records[id].acceptedBlock != 0;
    }

    function message(bytes32 id) external view returns (Record memory) {
        return _records[id];
    }

    function sources() external view returns (uint256[] memory chainIds, address[] memory ledgers) {
        return (_sourceChainIds, _sourceLedgers);
    }

    function isRegistered(uint256 chainId, address ledger) external view returns (bool) {
        return _sources[_key(chainId, ledger)].registered;
    }

    function signers(uint256 chainId, address ledger) external view returns (address[] memory) {
        return _sources[_key(chainId, ledger)].signers;
    }

    function isSigner(uint256 chainId, address ledger, address account) external view returns (bool) {
        return _sources[_key(chainId, ledger)].isSigner[account];
    }

    function quorum(uint256 chainId, address ledger) external view returns (uint32) {
        return _sources[_key(chainId, ledger)].quorum;
    }
}
