/**
 * Secure aggregation (Bonawitz et al. 2017; SecAgg+ of Bell et al. 2020): a
 * pure library, no sockets. The round loop drives SecAggSite on each worker and
 * SecAggServer on the coordinator; docs/privacy.md describes the protocol.
 *
 * Against the API first agreed:
 * - SecAggSite.shareKeys and SecAggServer.finish are async (return Promises):
 *   the audited Shamir package's split/combine are async.
 * - SecAggServer.addKeys/addShares/addMaskedInput/addUnmask return the
 *   SecAggSiteError that dropped the site (or null); they never throw for a
 *   site's bad message. drops() lists every refusal.
 * - SecAggServer.u1()/u2()/u3() close their phase and throw
 *   SecAggBelowThreshold (phase 'advertise' | 'share-keys' | 'masked-input')
 *   when fewer than threshold sites made it; finish() throws it with phase
 *   'unmask'. Added SecAggServer.neighbours(site).
 * - A site's methods throw SecAggSiteError for a message it refuses (the site
 *   then leaves the attempt).
 */
export { cryptoUniform, decode, encode, fixedPointScale, quantisationBound } from './quantise.ts';
export { graphOf, neighboursOf } from './graph.ts';
export { addPrg, prgWords } from './prg.ts';
export { combineShares, splitSecret } from './shamir.ts';
export {
  SecAggBelowThreshold,
  SecAggSiteError,
  SEALED_PAIR_BYTES,
  SHARE_BYTES,
  shareThreshold,
  type PublicKeys,
  type SecAggPhase,
  type SecAggRoundParams,
} from './protocol.ts';
export { SecAggSite } from './site.ts';
export { SecAggServer, type SecAggObserver, type SecAggServerParams, type UnmaskResponse } from './server.ts';
