package ipsec

// The xfrm netlink conversation. It uses vishvananda/netlink's nl layer
// (message structs, socket, request) but not its XfrmState and XfrmPolicy
// API, for two reasons found on v1.3.1:
//
//   - reading back, it decides an address's family from its bytes, not from
//     the message's family field: an IPv6 address whose last 12 bytes are
//     zero (fd02::/64, 2001:db8::) comes back as an IPv4 address, so a
//     policy on such a pod CIDR could never be recognised and would be
//     rewritten on every Apply;
//   - it cannot set a state's flags, and a state that carries both inner
//     families (IPv6 pods over an IPv4 underlay, or the reverse) needs
//     XFRM_STATE_AF_UNSPEC.

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Kernel constants of <linux/xfrm.h> the nl package does not name.
const (
	protoESP         = unix.IPPROTO_ESP
	modeTunnel       = 1 // XFRM_MODE_TUNNEL
	policyIn         = 0 // XFRM_POLICY_IN
	policyOut        = 1 // XFRM_POLICY_OUT
	policyFwd        = 2 // XFRM_POLICY_FWD
	policyTypeMain   = 0 // XFRM_POLICY_TYPE_MAIN
	policyAllow      = 0 // XFRM_POLICY_ALLOW
	sizeofPolicyType = 4 // struct xfrm_userpolicy_type
	// netlinkTimeout bounds one request, so that a wedged kernel cannot
	// hang Apply for ever (a netlink call cannot be cancelled).
	netlinkTimeout = 10
)

// xfrmKernel is what a Manager and the kernel check need of xfrm: an
// xfrmSocket, or a fake kernel in unit tests.
type xfrmKernel interface {
	listSAs() ([]sa, error)
	listPolicies() ([]policy, error)
	addSA(sa) error
	delSA(sa) error
	addPolicy(policy) error
	updatePolicy(policy) error
	delPolicy(policy) error
	close()
}

// xfrmSocket is one NETLINK_XFRM socket in a network namespace.
type xfrmSocket struct {
	sh *nl.SocketHandle
}

// openXfrm opens the socket in ns (ns <= 0: the caller's namespace). A
// kernel without xfrm's netlink interface refuses the socket with
// EPROTONOSUPPORT.
func openXfrm(ns netns.NsHandle) (*xfrmSocket, error) {
	target := netns.None()
	if ns > 0 {
		target = ns
	}
	s, err := nl.GetNetlinkSocketAt(target, netns.None(), unix.NETLINK_XFRM)
	if err != nil {
		if errors.Is(err, unix.EPROTONOSUPPORT) {
			u := &UnsupportedError{}
			u.add(MissingFeature{Feature: "the xfrm netlink interface", Options: narrowOptions([]string{"CONFIG_XFRM_USER"}, readKernelConfig()), Err: err})
			return nil, u
		}
		return nil, fmt.Errorf("ipsec: open xfrm netlink socket: %w", err)
	}
	tv := unix.Timeval{Sec: netlinkTimeout}
	if err := s.SetSendTimeout(&tv); err == nil {
		err = s.SetReceiveTimeout(&tv)
	}
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("ipsec: set xfrm socket timeouts: %w", err)
	}
	// The kernel's own words ("Requested AEAD algorithm not found") in
	// errors; kernels without extended acks just do not send them.
	_ = s.SetExtAck(true)
	return &xfrmSocket{sh: &nl.SocketHandle{Socket: s}}, nil
}

func (x *xfrmSocket) close() { x.sh.Close() }

func (x *xfrmSocket) request(msgType, flags int) *nl.NetlinkRequest {
	req := nl.NewNetlinkRequest(msgType, flags)
	req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_XFRM: x.sh}
	return req
}

// algo is one algorithm of a state: an AEAD (bits: ICV length), a cipher,
// or an authentication algorithm (bits: truncation length).
type algo struct {
	name string
	key  []byte
	bits uint32
}

// sa is a state as the kernel holds it.
type sa struct {
	src, dst   netip.Addr
	spi, reqid uint32
	proto      uint8
	mode       uint8
	flags      uint8
	replay     uint8
	aead       *algo
	crypt      *algo
	auth       *algo
	// mark is the state's mark {value, mask}, nil for none: a state with
	// a mark is found (and deleted) only with it.
	mark *[2]uint32
	// foreignAttrs: the kernel reported what Trellis never sets
	// (compression, encapsulation, an interface id, an offload).
	foreignAttrs bool
}

// saFromState is what Apply installs for s.
func saFromState(s State) sa {
	return sa{
		src: s.Src, dst: s.Dst, spi: s.SPI, reqid: s.Reqid,
		proto: protoESP, mode: modeTunnel, flags: nl.XFRM_STATE_AF_UNSPEC, replay: ReplayWindow,
		aead: &algo{name: AEADAlgorithm, key: s.Key, bits: AEADICVBits},
	}
}

// matches reports whether the kernel's state k is what Apply would
// install for want. Compared: what a state's identity and its traffic
// depend on, and what the kernel echoes as given. Not compared: the
// replay window and flags (a kernel may normalise them, and comparing
// them could make every Apply replace the state).
func (k sa) matches(want sa) bool {
	return k.src == want.src && k.dst == want.dst && k.spi == want.spi && k.reqid == want.reqid &&
		k.proto == want.proto && k.mode == want.mode && k.mark == nil && !k.foreignAttrs &&
		k.crypt == nil && k.auth == nil && k.aead != nil && want.aead != nil &&
		k.aead.name == want.aead.name && k.aead.bits == want.aead.bits && bytes.Equal(k.aead.key, want.aead.key)
}

func family(a netip.Addr) uint16 {
	if a.Is4() {
		return nl.FAMILY_V4
	}
	return nl.FAMILY_V6
}

func putAddr(x *nl.XfrmAddress, a netip.Addr) {
	*x = nl.XfrmAddress{}
	if a.Is4() {
		b := a.As4()
		copy(x[:4], b[:])
	} else {
		b := a.As16()
		copy(x[:], b[:])
	}
}

// getAddr reads an address by the message's family, never by its bytes.
func getAddr(x nl.XfrmAddress, fam uint16) (netip.Addr, bool) {
	switch fam {
	case nl.FAMILY_V4:
		return netip.AddrFrom4([4]byte(x[:4])), true
	case nl.FAMILY_V6:
		return netip.AddrFrom16([16]byte(x[:])), true
	}
	return netip.Addr{}, false
}

func infiniteLifetime(l *nl.XfrmLifetimeCfg) {
	// Zero byte and packet limits would expire the state at once.
	l.SoftByteLimit = nl.XFRM_INF
	l.HardByteLimit = nl.XFRM_INF
	l.SoftPacketLimit = nl.XFRM_INF
	l.HardPacketLimit = nl.XFRM_INF
}

func algoName(name string) (out [64]byte) {
	copy(out[:63], name)
	return out
}

// encodeSA returns the body of an XFRM_MSG_NEWSA request: struct
// xfrm_usersa_info and the algorithm attributes. The selector stays empty
// (any inner packet) with XFRM_STATE_AF_UNSPEC, so one state carries both
// inner families; the policies decide what enters it.
func encodeSA(s sa) []nl.NetlinkRequestData {
	info := &nl.XfrmUsersaInfo{}
	putAddr(&info.Id.Daddr, s.dst)
	putAddr(&info.Saddr, s.src)
	info.Id.Spi = nl.Swap32(s.spi)
	info.Id.Proto = s.proto
	info.Family = family(s.dst)
	info.Mode = s.mode
	info.Reqid = s.reqid
	info.ReplayWindow = s.replay
	info.Flags = s.flags
	infiniteLifetime(&info.Lft)
	data := []nl.NetlinkRequestData{info}
	if a := s.aead; a != nil {
		m := nl.XfrmAlgoAEAD{AlgName: algoName(a.name), AlgKeyLen: uint32(len(a.key) * 8), AlgICVLen: a.bits, AlgKey: a.key}
		data = append(data, nl.NewRtAttr(nl.XFRMA_ALG_AEAD, m.Serialize()))
	}
	if a := s.crypt; a != nil {
		m := nl.XfrmAlgo{AlgName: algoName(a.name), AlgKeyLen: uint32(len(a.key) * 8), AlgKey: a.key}
		data = append(data, nl.NewRtAttr(nl.XFRMA_ALG_CRYPT, m.Serialize()))
	}
	if a := s.auth; a != nil {
		m := nl.XfrmAlgoAuth{AlgName: algoName(a.name), AlgKeyLen: uint32(len(a.key) * 8), AlgTruncLen: a.bits, AlgKey: a.key}
		data = append(data, nl.NewRtAttr(nl.XFRMA_ALG_AUTH_TRUNC, m.Serialize()))
	}
	return data
}

// serialize lays out request data as the kernel receives it after the
// netlink header: what decodeSA and decodePolicy read in unit tests.
func serialize(data []nl.NetlinkRequestData) []byte {
	var b []byte
	for _, d := range data {
		b = append(b, d.Serialize()...)
	}
	return b
}

// decodeSA reads a struct xfrm_usersa_info and its attributes, as the
// kernel sends them in a dump.
func decodeSA(m []byte) (sa, error) {
	if len(m) < nl.SizeofXfrmUsersaInfo {
		return sa{}, fmt.Errorf("ipsec: short xfrm state message (%d bytes)", len(m))
	}
	info := *nl.DeserializeXfrmUsersaInfo(m)
	s := sa{
		spi: nl.Swap32(info.Id.Spi), reqid: info.Reqid, proto: info.Id.Proto,
		mode: info.Mode, flags: info.Flags, replay: info.ReplayWindow,
	}
	var ok1, ok2 bool
	s.dst, ok1 = getAddr(info.Id.Daddr, info.Family)
	s.src, ok2 = getAddr(info.Saddr, info.Family)
	if !ok1 || !ok2 {
		return sa{}, fmt.Errorf("ipsec: xfrm state spi %#08x of family %d", s.spi, info.Family)
	}
	attrs, err := nl.ParseRouteAttr(m[nl.SizeofXfrmUsersaInfo:])
	if err != nil {
		return sa{}, fmt.Errorf("ipsec: xfrm state spi %#08x: %w", s.spi, err)
	}
	for _, a := range attrs {
		v := a.Value
		switch a.Attr.Type {
		case nl.XFRMA_ALG_AEAD:
			if s.aead, err = decodeAlgo(v, 72, 68); err != nil {
				return sa{}, fmt.Errorf("ipsec: xfrm state spi %#08x: aead: %w", s.spi, err)
			}
		case nl.XFRMA_ALG_CRYPT, nl.XFRMA_ALG_AUTH:
			alg, err := decodeAlgo(v, 68, -1)
			if err != nil {
				return sa{}, fmt.Errorf("ipsec: xfrm state spi %#08x: algorithm: %w", s.spi, err)
			}
			if a.Attr.Type == nl.XFRMA_ALG_CRYPT {
				s.crypt = alg
			} else if s.auth == nil {
				s.auth = alg
			}
		case nl.XFRMA_ALG_AUTH_TRUNC:
			if s.auth, err = decodeAlgo(v, 72, 68); err != nil {
				return sa{}, fmt.Errorf("ipsec: xfrm state spi %#08x: auth: %w", s.spi, err)
			}
		case nl.XFRMA_MARK:
			if len(v) >= 8 {
				mk := [2]uint32{nl.NativeEndian().Uint32(v[0:4]), nl.NativeEndian().Uint32(v[4:8])}
				if mk != [2]uint32{} {
					s.mark = &mk
				}
			}
		case nl.XFRMA_ALG_COMP, nl.XFRMA_ENCAP, nl.XFRMA_IF_ID, nl.XFRMA_OFFLOAD_DEV, nl.XFRMA_SEC_CTX:
			s.foreignAttrs = true
		}
	}
	return s, nil
}

// decodeAlgo reads struct xfrm_algo (key at 68, no bits), xfrm_algo_aead
// or xfrm_algo_auth (key at 72, bits at 68): name[64], key length in bits
// at 64.
func decodeAlgo(v []byte, keyAt, bitsAt int) (*algo, error) {
	if len(v) < keyAt {
		return nil, fmt.Errorf("%d bytes", len(v))
	}
	keyBits := nl.NativeEndian().Uint32(v[64:68])
	end := keyAt + int((keyBits+7)/8)
	if end > len(v) {
		return nil, fmt.Errorf("key of %d bits in %d bytes", keyBits, len(v))
	}
	a := &algo{name: string(v[:bytes.IndexByte(append(v[:64:64], 0), 0)]), key: bytes.Clone(v[keyAt:end])}
	if bitsAt >= 0 {
		a.bits = nl.NativeEndian().Uint32(v[bitsAt : bitsAt+4])
	}
	return a, nil
}

// tmpl is one template of a policy.
type tmpl struct {
	src, dst   netip.Addr
	spi, reqid uint32
	proto      uint8
	mode       uint8
	optional   uint8
}

// policy is a policy as the kernel holds it.
type policy struct {
	dir      uint8 // XFRM_POLICY_IN, OUT or FWD
	src, dst netip.Prefix
	priority uint32
	index    uint32
	action   uint8
	tmpls    []tmpl
	// The rest of a policy's identity; zero for Trellis's.
	selExtra bool // protocol, ports or interface in the selector
	mark     *[2]uint32
	ifID     uint32
	ptype    uint8
}

func kernelDir(d Direction) uint8 {
	switch d {
	case DirIn:
		return policyIn
	case DirFwd:
		return policyFwd
	}
	return policyOut
}

func directionOf(dir uint8) Direction {
	switch dir {
	case policyIn:
		return DirIn
	case policyFwd:
		return DirFwd
	case policyOut:
		return DirOut
	}
	return 0
}

// policyFromPlan is what Apply installs for p.
func policyFromPlan(p Policy) policy {
	return policy{
		dir: kernelDir(p.Dir), src: p.Src, dst: p.Dst, action: policyAllow,
		tmpls: []tmpl{{src: p.TmplSrc, dst: p.TmplDst, reqid: p.Reqid, proto: protoESP, mode: modeTunnel}},
	}
}

// plainID reports whether the policy's kernel identity is of the kind
// Trellis's have: type main, no mark, no interface id, a selector of
// addresses only. Such a policy holds the place of Trellis's policy of the
// same direction and selector.
func (p policy) plainID() bool {
	return !p.selExtra && p.mark == nil && p.ifID == 0 && p.ptype == policyTypeMain && directionOf(p.dir) != 0
}

// plain reports whether the policy has the shape Plan makes: a plain
// identity and one template.
func (p policy) plain() bool { return p.plainID() && len(p.tmpls) == 1 }

// owned reports whether a template carries a reqid of Trellis's range.
func (p policy) owned() bool {
	for _, t := range p.tmpls {
		if IsOwnerReqid(t.reqid) {
			return true
		}
	}
	return false
}

func (p policy) id() PolicyID { return PolicyID{directionOf(p.dir), p.src, p.dst} }

// matches reports whether the kernel's policy k is what Apply would
// install for want.
func (k policy) matches(want policy) bool {
	return k.plain() && k.dir == want.dir && k.src == want.src && k.dst == want.dst &&
		k.priority == want.priority && k.action == want.action && k.tmpls[0] == want.tmpls[0]
}

// encodePolicy returns the body of an XFRM_MSG_NEWPOLICY or
// XFRM_MSG_UPDPOLICY request.
func encodePolicy(p policy) []nl.NetlinkRequestData {
	info := &nl.XfrmUserpolicyInfo{}
	putAddr(&info.Sel.Daddr, p.dst.Addr())
	putAddr(&info.Sel.Saddr, p.src.Addr())
	info.Sel.Family = family(p.dst.Addr())
	info.Sel.PrefixlenD = uint8(p.dst.Bits())
	info.Sel.PrefixlenS = uint8(p.src.Bits())
	infiniteLifetime(&info.Lft)
	info.Priority = p.priority
	info.Dir = p.dir
	info.Action = p.action
	tmpls := make([]byte, 0, nl.SizeofXfrmUserTmpl*len(p.tmpls))
	for _, t := range p.tmpls {
		u := &nl.XfrmUserTmpl{}
		putAddr(&u.XfrmId.Daddr, t.dst)
		putAddr(&u.Saddr, t.src)
		u.XfrmId.Spi = nl.Swap32(t.spi)
		u.XfrmId.Proto = t.proto
		u.Family = family(t.dst)
		u.Reqid = t.reqid
		u.Mode = t.mode
		u.Optional = t.optional
		// Any algorithm the state has.
		u.Aalgos, u.Ealgos, u.Calgos = ^uint32(0), ^uint32(0), ^uint32(0)
		tmpls = append(tmpls, u.Serialize()...)
	}
	return []nl.NetlinkRequestData{info, nl.NewRtAttr(nl.XFRMA_TMPL, tmpls)}
}

// decodePolicy reads a struct xfrm_userpolicy_info and its attributes.
func decodePolicy(m []byte) (policy, error) {
	if len(m) < nl.SizeofXfrmUserpolicyInfo {
		return policy{}, fmt.Errorf("ipsec: short xfrm policy message (%d bytes)", len(m))
	}
	info := *nl.DeserializeXfrmUserpolicyInfo(m)
	sel := info.Sel
	p := policy{dir: info.Dir, priority: info.Priority, index: info.Index, action: info.Action}
	dst, ok1 := getAddr(sel.Daddr, sel.Family)
	src, ok2 := getAddr(sel.Saddr, sel.Family)
	if ok1 && ok2 {
		p.dst = netip.PrefixFrom(dst, int(sel.PrefixlenD))
		p.src = netip.PrefixFrom(src, int(sel.PrefixlenS))
	}
	// A selector of no family (or a prefix too long for it) is not one
	// Trellis makes; it stays foreign unless its templates say otherwise.
	p.selExtra = !p.dst.IsValid() || !p.src.IsValid() || sel.Proto != 0 || sel.Dport != 0 || sel.Sport != 0 || sel.Ifindex != 0
	attrs, err := nl.ParseRouteAttr(m[nl.SizeofXfrmUserpolicyInfo:])
	if err != nil {
		return policy{}, fmt.Errorf("ipsec: xfrm policy %d: %w", info.Index, err)
	}
	for _, a := range attrs {
		v := a.Value
		switch a.Attr.Type {
		case nl.XFRMA_TMPL:
			for len(v) >= nl.SizeofXfrmUserTmpl {
				u := *nl.DeserializeXfrmUserTmpl(v[:nl.SizeofXfrmUserTmpl])
				v = v[nl.SizeofXfrmUserTmpl:]
				t := tmpl{spi: nl.Swap32(u.XfrmId.Spi), reqid: u.Reqid, proto: u.XfrmId.Proto, mode: u.Mode, optional: u.Optional}
				fam := u.Family
				if fam == 0 {
					fam = sel.Family // the kernel's rule for templates without one
				}
				t.dst, _ = getAddr(u.XfrmId.Daddr, fam)
				t.src, _ = getAddr(u.Saddr, fam)
				p.tmpls = append(p.tmpls, t)
			}
		case nl.XFRMA_MARK:
			if len(v) >= 8 {
				mk := [2]uint32{nl.NativeEndian().Uint32(v[0:4]), nl.NativeEndian().Uint32(v[4:8])}
				if mk != [2]uint32{} {
					p.mark = &mk
				}
			}
		case nl.XFRMA_IF_ID:
			if len(v) >= 4 {
				p.ifID = nl.NativeEndian().Uint32(v)
			}
		case nl.XFRMA_POLICY_TYPE:
			if len(v) >= 1 {
				p.ptype = v[0]
			}
		case nl.XFRMA_SEC_CTX:
			p.selExtra = true
		}
	}
	return p, nil
}

// listSAs dumps every state of the namespace.
func (x *xfrmSocket) listSAs() ([]sa, error) {
	msgs, err := dump(x, nl.XFRM_MSG_GETSA, nl.XFRM_MSG_NEWSA)
	if err != nil {
		return nil, fmt.Errorf("ipsec: list xfrm states: %w", err)
	}
	out := make([]sa, 0, len(msgs))
	for _, m := range msgs {
		s, err := decodeSA(m)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// listPolicies dumps every policy of the namespace (socket policies are
// not in dumps).
func (x *xfrmSocket) listPolicies() ([]policy, error) {
	msgs, err := dump(x, nl.XFRM_MSG_GETPOLICY, nl.XFRM_MSG_NEWPOLICY)
	if err != nil {
		return nil, fmt.Errorf("ipsec: list xfrm policies: %w", err)
	}
	out := make([]policy, 0, len(msgs))
	for _, m := range msgs {
		p, err := decodePolicy(m)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// dump runs a dump request, again when the kernel interrupted it because
// the table changed under it.
func dump(x *xfrmSocket, msgType int, resType uint16) ([][]byte, error) {
	var (
		msgs [][]byte
		err  error
	)
	for range 5 {
		msgs, err = x.request(msgType, unix.NLM_F_DUMP).Execute(unix.NETLINK_XFRM, resType)
		if !errors.Is(err, nl.ErrDumpInterrupted) {
			break
		}
	}
	return msgs, err
}

func (x *xfrmSocket) exec(msgType, flags int, data []nl.NetlinkRequestData) error {
	req := x.request(msgType, flags|unix.NLM_F_ACK)
	for _, d := range data {
		req.AddData(d)
	}
	_, err := req.Execute(unix.NETLINK_XFRM, 0)
	return err
}

func (x *xfrmSocket) addSA(s sa) error {
	return x.exec(nl.XFRM_MSG_NEWSA, unix.NLM_F_CREATE|unix.NLM_F_EXCL, encodeSA(s))
}

// delSA deletes the state of s's identity: destination, SPI, protocol,
// and its mark if it has one.
func (x *xfrmSocket) delSA(s sa) error {
	id := &nl.XfrmUsersaId{Spi: nl.Swap32(s.spi), Family: family(s.dst), Proto: s.proto}
	putAddr(&id.Daddr, s.dst)
	data := []nl.NetlinkRequestData{id}
	if s.mark != nil {
		data = append(data, nl.NewRtAttr(nl.XFRMA_MARK, (&nl.XfrmMark{Value: s.mark[0], Mask: s.mark[1]}).Serialize()))
	}
	err := x.exec(nl.XFRM_MSG_DELSA, 0, data)
	if isGone(err) {
		return nil
	}
	return err
}

func (x *xfrmSocket) addPolicy(p policy) error {
	return x.exec(nl.XFRM_MSG_NEWPOLICY, unix.NLM_F_CREATE|unix.NLM_F_EXCL, encodePolicy(p))
}

// updatePolicy replaces the policy of p's identity in one step.
func (x *xfrmSocket) updatePolicy(p policy) error {
	return x.exec(nl.XFRM_MSG_UPDPOLICY, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, encodePolicy(p))
}

// delPolicy deletes a policy the kernel listed, by its index (with the
// mark, interface id and type the index lookup also matches).
func (x *xfrmSocket) delPolicy(p policy) error {
	id := &nl.XfrmUserpolicyId{Index: p.index, Dir: p.dir}
	if p.index == 0 {
		// Not from a listing: by selector.
		putAddr(&id.Sel.Daddr, p.dst.Addr())
		putAddr(&id.Sel.Saddr, p.src.Addr())
		id.Sel.Family = family(p.dst.Addr())
		id.Sel.PrefixlenD = uint8(p.dst.Bits())
		id.Sel.PrefixlenS = uint8(p.src.Bits())
	}
	data := []nl.NetlinkRequestData{id}
	if p.mark != nil {
		data = append(data, nl.NewRtAttr(nl.XFRMA_MARK, (&nl.XfrmMark{Value: p.mark[0], Mask: p.mark[1]}).Serialize()))
	}
	if p.ifID != 0 {
		data = append(data, nl.NewRtAttr(nl.XFRMA_IF_ID, nl.Uint32Attr(p.ifID)))
	}
	if p.ptype != policyTypeMain {
		data = append(data, nl.NewRtAttr(nl.XFRMA_POLICY_TYPE, []byte{p.ptype, 0, 0, 0}[:sizeofPolicyType]))
	}
	err := x.exec(nl.XFRM_MSG_DELPOLICY, 0, data)
	if isGone(err) {
		return nil
	}
	return err
}

// isGone: a state that is not there answers ESRCH, a policy ENOENT.
func isGone(err error) bool { return errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENOENT) }
