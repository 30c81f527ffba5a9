// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title TaskLedger — the ledger of one collaborative training task on one chain.
/// @notice The admin (deployer) governs membership. Active members submit one model update per
///         round (a sha256 digest plus, optionally, the encoded payload itself, which then lives in
///         the event log) and, after a round closed, attest the digest of the global model they
///         computed by replaying that round. The chain's total order of `UpdateSubmitted` events is
///         what makes every member aggregate the same updates in the same order.
/// @dev Rules (see contracts/README.md):
///      - `start()` (admin) opens round 0. Rounds are numbered 0 .. nRounds-1.
///      - Updates are accepted only for `currentRound` while the task is running, once per member,
///        with 1 <= nSamples <= maxSamples (the cap fixed at deployment): a member cannot stall the
///        task with a zero aggregation weight, nor outweigh the others with a huge self-reported count.
///      - Removing a member withdraws its update to the open round (`withdrawn(r, m)`, no longer in
///        `submittedCount`); re-adding it within the round restores it. Closed rounds never change.
///      - A round closes inside `submitUpdate` (or `removeMember`) as soon as every active member
///        has submitted to it; or anyone may call `closeRound()` once
///        `block.number > roundOpenBlock[r] + roundDeadlineBlocks` (deadline > 0) and at least
///        `quorum` updates arrived. Late updates are accepted until the round is actually closed.
///      - Closing round r opens round r+1 in the same block, unless r+1 == nRounds: then the task is
///        finished and `currentRound == nRounds` (so every round < currentRound is closed).
///      - `attest(r, d)` is allowed once round r closed, once per active member and round. The
///        leading (majority) digest is the one with the most attestations (the earlier one wins a
///        tie). An attestation that differs from the leading digest at the time it is made is
///        recorded, counted and flagged by `AttestationMismatch` — never rejected.
///      - Data availability (a member may post a digest whose payload it never stores): once round r
///        closed, every member posts one `reportAvailability(r, missing)` listing the senders of r
///        whose payload it could not fetch and verify (usually none). Round r's availability is
///        *sealed* by the report that makes it one per active member, or, with a deadline, by
///        `sealAvailability(r)` once `roundDeadlineBlocks` blocks passed since r closed and `quorum`
///        members reported. From the seal on nothing changes: an update is *unavailable* (left out
///        of r by every replica, including one that holds its bytes) iff more than half of the
///        reporters other than its sender listed it. With an honest majority of members an
///        available update is never excluded and a withheld one always is. Replicas aggregate r
///        only after the seal. An update whose payload is inline (in this contract's log) is
///        always available: replicas ignore the flag for it, and a round whose payloads are all
///        inline needs no reports at all (nodes skip it).
contract TaskLedger {
    // ------------------------------------------------------------------ errors
    error NotAdmin(address caller);
    error NotAMember(address caller);
    error AlreadyMember(address member);
    error InvalidMember(address member);
    error NotStarted();
    error AlreadyStarted();
    error TaskFinished();
    error FutureRound(uint32 round, uint32 currentRound);
    error RoundClosed(uint32 round, uint32 currentRound);
    error AlreadySubmitted(uint32 round, address member);
    error ZeroDigest();
    error NoDeadline();
    error DeadlineNotPassed(uint32 round, uint64 deadlineBlock, uint64 blockNumber);
    error QuorumNotReached(uint32 round, uint32 submitted, uint32 quorum);
    error RoundNotClosed(uint32 round, uint32 currentRound);
    error AlreadyAttested(uint32 round, address member);
    error InvalidTask(string reason);
    error ZeroSamples();
    error TooManySamples(uint64 nSamples, uint64 maxSamples);
    error AlreadyReported(uint32 round, address member);
    error NoSuchUpdate(uint32 round, address sender);
    error SelfReport(uint32 round, address member);
    error UnsortedReport(uint32 round);
    error AlreadySealed(uint32 round);
    error AvailabilityNotDue(uint32 round, uint32 reports, uint32 members, uint64 deadlineBlock);

    // ------------------------------------------------------------------ events
    event MemberAdded(address indexed member);
    event MemberRemoved(address indexed member);
    event TaskStarted(uint64 blockNumber);
    event RoundOpened(uint32 indexed round, uint64 blockNumber);
    event RoundEnded(uint32 indexed round, uint64 blockNumber, uint32 submitted);
    event TaskCompleted(uint64 blockNumber);
    event UpdateSubmitted(
        uint32 indexed round,
        address indexed sender,
        bytes32 digest,
        uint32 nValues,
        uint64 nSamples,
        bytes payload
    );
    event Attested(uint32 indexed round, address indexed member, bytes32 digest);
    event AttestationMismatch(uint32 indexed round, address indexed member, bytes32 digest, bytes32 majorityDigest);
    event AvailabilityReported(uint32 indexed round, address indexed member, address[] missing);
    event AvailabilitySealed(uint32 indexed round, uint64 blockNumber, uint32 reports);

    // ------------------------------------------------------------------ task metadata
    address public immutable admin;
    string public modelArch;
    bytes32 public immutable initialModelDigest;
    uint32 public immutable nRounds;
    string public params;
    uint64 public immutable roundDeadlineBlocks;
    uint32 public immutable quorum;
    uint64 public immutable maxSamples;

    // ------------------------------------------------------------------ state
    bool public started;
    bool public finished;
    uint32 public currentRound;

    address[] private _members;
    mapping(address => uint256) private _memberIndex; // index + 1; 0 = not a member

    mapping(uint32 => uint64) public roundOpenBlock;
    mapping(uint32 => uint64) public roundCloseBlock; // 0 = not closed
    mapping(uint32 => uint32) public submittedCount;
    mapping(uint32 => mapping(address => bool)) public hasSubmitted;
    // Updates of round r whose sender was removed before r closed (and not re-added): not counted.
    mapping(uint32 => mapping(address => bool)) public withdrawn;
    // Updates of the current round by members that are still active (drives the automatic close).
    uint32 private _activeSubmitted;

    struct RoundAttestations {
        address[] members;
        bytes32[] digests;
        mapping(address => bool) attested;
        mapping(bytes32 => uint32) count;
        bytes32 majority;
        uint32 mismatches;
    }
    mapping(uint32 => RoundAttestations) private _att;

    // Availability of round r's payloads: reports so far and the seal block (0 = not sealed), one slot.
    struct Availability {
        uint32 reports;
        uint64 sealBlock;
    }
    mapping(uint32 => Availability) public availability;
    mapping(uint32 => mapping(address => bool)) public reportedAvailability;
    mapping(uint32 => mapping(address => uint32)) public unavailableReports;

    constructor(
        string memory modelArch_,
        bytes32 initialModelDigest_,
        uint32 nRounds_,
        string memory params_,
        uint64 roundDeadlineBlocks_,
        uint32 quorum_,
        uint64 maxSamples_
    ) {
        if (nRounds_ == 0) revert InvalidTask("nRounds must be at least 1");
        if (quorum_ == 0) revert InvalidTask("quorum must be at least 1");
        if (maxSamples_ == 0) revert InvalidTask("maxSamples must be at least 1");
        admin = msg.sender;
        modelArch = modelArch_;
        initialModelDigest = initialModelDigest_;
        nRounds = nRounds_;
        params = params_;
        roundDeadlineBlocks = roundDeadlineBlocks_;
        quorum = quorum_;
        maxSamples = maxSamples_;
    }

    // ------------------------------------------------------------------ modifiers
    modifier onlyAdmin() {
        if (msg.sender != admin) revert NotAdmin(msg.sender);
        _;
    }

    modifier onlyMember() {
        if (_memberIndex[msg.sender] == 0) revert NotAMember(msg.sender);
        _;
    }

    // ------------------------------------------------------------------ membership
    function addMember(address member) external onlyAdmin {
        if (member == address(0)) revert InvalidMember(member);
        if (_memberIndex[member] != 0) revert AlreadyMember(member);
        _members.push(member);
        _memberIndex[member] = _members.length;
        // A member removed and re-added within a round keeps its update to that round.
        if (started && !finished && hasSubmitted[currentRound][member]) {
            _activeSubmitted += 1;
            submittedCount[currentRound] += 1;
            withdrawn[currentRound][member] = false;
        }
        emit MemberAdded(member);
    }

    /// @notice Removes an active member (order of the others is kept). Its update to the open round,
    ///         if any, is withdrawn. If the task is running and every remaining member already
    ///         submitted to the current round, that round closes.
    function removeMember(address member) external onlyAdmin {
        uint256 idx = _memberIndex[member];
        if (idx == 0) revert NotAMember(member);
        uint256 n = _members.length;
        for (uint256 i = idx; i < n; i++) {
            address moved = _members[i];
            _members[i - 1] = moved;
            _memberIndex[moved] = i;
        }
        _members.pop();
        delete _memberIndex[member];
        emit MemberRemoved(member);
        if (started && !finished) {
            if (hasSubmitted[currentRound][member]) {
                _activeSubmitted -= 1;
                submittedCount[currentRound] -= 1;
                withdrawn[currentRound][member] = true;
            }
            if (_members.length > 0 && _activeSubmitted == _members.length) _closeRound();
        }
    }

    function members() external view returns (address[] memory) {
        return _members;
    }

    function memberCount() external view returns (uint256) {
        return _members.length;
    }

    function isMember(address account) external view returns (bool) {
        return _memberIndex[account] != 0;
    }

    // ------------------------------------------------------------------ rounds
    function start() external onlyAdmin {
        if (started) revert AlreadyStarted();
        started = true;
        roundOpenBlock[0] = uint64(block.number);
        emit TaskStarted(uint64(block.number));
        emit RoundOpened(0, uint64(block.number));
    }

    function submitUpdate(
        uint32 round,
        bytes32 digest,
        uint32 nValues,
        uint64 nSamples,
        bytes calldata payload
    ) external {
        if (!started) revert NotStarted();
        if (finished) revert TaskFinished();
        if (_memberIndex[msg.sender] == 0) revert NotAMember(msg.sender);
        uint32 cur = currentRound;
        if (round > cur) revert FutureRound(round, cur);
        if (round < cur) revert RoundClosed(round, cur);
        if (hasSubmitted[round][msg.sender]) revert AlreadySubmitted(round, msg.sender);
        if (digest == bytes32(0)) revert ZeroDigest();
        if (nSamples == 0) revert ZeroSamples();
        if (nSamples > maxSamples) revert TooManySamples(nSamples, maxSamples);

        hasSubmitted[round][msg.sender] = true;
        submittedCount[round] += 1;
        _activeSubmitted += 1;
        emit UpdateSubmitted(round, msg.sender, digest, nValues, nSamples, payload);

        if (_activeSubmitted == _members.length) _closeRound();
    }

    /// @notice Closes the current round after its deadline, provided `quorum` updates arrived.
    function closeRound() external {
        if (!started) revert NotStarted();
        if (finished) revert TaskFinished();
        uint32 cur = currentRound;
        if (roundDeadlineBlocks == 0) revert NoDeadline();
        uint64 deadline = roundOpenBlock[cur] + roundDeadlineBlocks;
        if (uint64(block.number) <= deadline) revert DeadlineNotPassed(cur, deadline, uint64(block.number));
        if (submittedCount[cur] < quorum) revert QuorumNotReached(cur, submittedCount[cur], quorum);
        _closeRound();
    }

    function _closeRound() private {
        uint32 cur = currentRound;
        uint64 bn = uint64(block.number);
        roundCloseBlock[cur] = bn;
        emit RoundEnded(cur, bn, submittedCount[cur]);
        _activeSubmitted = 0;
        currentRound = cur + 1;
        if (cur + 1 == nRounds) {
            finished = true;
            emit TaskCompleted(bn);
        } else {
            roundOpenBlock[cur + 1] = bn;
            emit RoundOpened(cur + 1, bn);
        }
    }

    /// @notice Block after which `closeRound()` may be called for round `round` (0 = no deadline).
    function roundDeadlineBlock(uint32 round) external view returns (uint64) {
        // roundOpenBlock is never 0 for an opened round: start() runs in a block after genesis.
        if (roundDeadlineBlocks == 0 || roundOpenBlock[round] == 0) return 0;
        return roundOpenBlock[round] + roundDeadlineBlocks;
    }

    // ------------------------------------------------------------------ data availability
    /// @notice After round `round` closed: the senders of `round` whose payload this member could
    ///         not fetch and verify, in strictly increasing address order (empty: all available).
    ///         Once per member and round, before the round's availability is sealed.
    function reportAvailability(uint32 round, address[] calldata missing) external onlyMember {
        if (round >= currentRound || !started) revert RoundNotClosed(round, currentRound);
        Availability storage a = availability[round];
        if (a.sealBlock != 0) revert AlreadySealed(round);
        if (reportedAvailability[round][msg.sender]) revert AlreadyReported(round, msg.sender);
        address prev = address(0);
        for (uint256 i = 0; i < missing.length; i++) {
            address s = missing[i];
            if (s <= prev) revert UnsortedReport(round);
            if (s == msg.sender) revert SelfReport(round, msg.sender);
            if (!hasSubmitted[round][s] || withdrawn[round][s]) revert NoSuchUpdate(round, s);
            unavailableReports[round][s] += 1;
            prev = s;
        }
        reportedAvailability[round][msg.sender] = true;
        uint32 n = a.reports + 1;
        a.reports = n;
        emit AvailabilityReported(round, msg.sender, missing);
        if (n >= _members.length) _seal(round, a);
    }

    /// @notice Seals round `round`'s availability when every active member reported, or (task with a
    ///         deadline) once `roundDeadlineBlocks` blocks passed since it closed with `quorum` reports.
    function sealAvailability(uint32 round) external {
        if (round >= currentRound || !started) revert RoundNotClosed(round, currentRound);
        Availability storage a = availability[round];
        if (a.sealBlock != 0) revert AlreadySealed(round);
        uint64 deadline = roundDeadlineBlocks == 0 ? 0 : roundCloseBlock[round] + roundDeadlineBlocks;
        bool all = a.reports >= _members.length;
        bool late = deadline != 0 && uint64(block.number) > deadline && a.reports >= quorum;
        if (!all && !late) revert AvailabilityNotDue(round, a.reports, uint32(_members.length), deadline);
        _seal(round, a);
    }

    function _seal(uint32 round, Availability storage a) private {
        a.sealBlock = uint64(block.number);
        emit AvailabilitySealed(round, uint64(block.number), a.reports);
    }

    /// @notice Whether `sender`'s update to `round` is excluded as unavailable (false until sealed).
    function isUnavailable(uint32 round, address sender) external view returns (bool) {
        Availability storage a = availability[round];
        if (a.sealBlock == 0) return false;
        uint32 others = a.reports - (reportedAvailability[round][sender] ? 1 : 0);
        return 2 * uint256(unavailableReports[round][sender]) > others;
    }

    // ------------------------------------------------------------------ attestations
    function attest(uint32 round, bytes32 globalDigest) external onlyMember {
        if (!started) revert NotStarted();
        if (round >= currentRound) revert RoundNotClosed(round, currentRound);
        if (globalDigest == bytes32(0)) revert ZeroDigest();
        RoundAttestations storage a = _att[round];
        if (a.attested[msg.sender]) revert AlreadyAttested(round, msg.sender);
        a.attested[msg.sender] = true;
        a.members.push(msg.sender);
        a.digests.push(globalDigest);
        emit Attested(round, msg.sender, globalDigest);

        bytes32 maj = a.majority;
        if (maj != bytes32(0) && globalDigest != maj) {
            a.mismatches += 1;
            emit AttestationMismatch(round, msg.sender, globalDigest, maj);
        }
        uint32 c = a.count[globalDigest] + 1;
        a.count[globalDigest] = c;
        if (maj == bytes32(0) || (globalDigest != maj && c > a.count[maj])) a.majority = globalDigest;
    }

    function attestations(uint32 round) external view returns (address[] memory, bytes32[] memory) {
        RoundAttestations storage a = _att[round];
        return (a.members, a.digests);
    }

    function majorityDigest(uint32 round) external view returns (bytes32 digest, uint32 count) {
        RoundAttestations storage a = _att[round];
        return (a.majority, a.count[a.majority]);
    }

    function attestationCount(uint32 round, bytes32 digest) external view returns (uint32) {
        return _att[round].count[digest];
    }

    function mismatchCount(uint32 round) external view returns (uint32) {
        return _att[round].mismatches;
    }

    function hasAttested(uint32 round, address member) external view returns (bool) {
        return _att[round].attested[member];
    }

    // ------------------------------------------------------------------ task view
    function task()
        external
        view
        returns (
            address admin_,
            string memory modelArch_,
            bytes32 initialModelDigest_,
            uint32 nRounds_,
            string memory params_,
            uint64 roundDeadlineBlocks_,
            uint32 quorum_,
            bool started_,
            bool finished_,
            uint32 currentRound_
        )
    {
        return (admin, modelArch, initialModelDigest, nRounds, params, roundDeadlineBlocks, quorum,
                started, finished, currentRound);
    }
}
